# Issue 16, the one-row GEMV's exact split-K: each split stores an fp32 partial and the last of a column block
# sums them (no zeroing kernel, no bf16 atomics), with two narrow-tile configs added to the tuning space. One
# device call: the CUDA tests of the split (every split config, graph replays) and of the int8 plugin's
# kernel; the weight kernels per Qwen2-7B layer at one row; then batch-1 decode (compiled + captured) of bf16
# with cuBLAS, bf16 with the Triton GEMV, and int8, one process each, back to back.
#   bash bench/gpu.sh splitk16          (carry .engine-whl .test-whl; files go to bench/results/kernels16/splitk/)
WHEELS=".engine-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4"
step 150 pytest --no-header -rs sdk/tests/test_weight_kernels.py plugins/quant/int8/tests/test_int8.py -k cuda
step 200 weight_kernels --rows 1 --formats int8,bf16,int4 --output "$OUT/weight-kernels-h200.json"
for q in bf16:cublas bf16:triton int8:triton; do
  name=${q%%:*} kernel=${q#*:}
  step 75 decode_modes --quant "{\"name\": \"$name\", \"options\": {\"cuda_kernel\": \"$kernel\"}}" --batch-size 1 \
    --modes cudagraph+compile --new-tokens 64 --reps 3 --output "$OUT/decode-$name-$kernel-b1.json"
done

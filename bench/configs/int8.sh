# bench/h200_int8.sh before (issue 6): int8 kernels at decode sizes, then bf16 vs int8 (int8pack kernel) decode
# on the captured CUDA-graph path at batch 1 (no compile), Qwen2-7B shape.
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8"
step 40 int8_kernels --rows 1,8 --output "$OUT/int8-kernels-h200.json"
step 45 decode_modes --quant bf16 --batch-size 1 --modes cudagraph --new-tokens 64 --reps 2 \
  --output "$OUT/decode-cudagraph-bf16.json"
step 45 decode_modes --quant '{"name": "int8", "options": {"cuda_kernel": "int8pack"}}' --batch-size 1 \
  --modes cudagraph --new-tokens 64 --reps 2 --output "$OUT/decode-cudagraph-nameint8opti.json"

# Issue 16, batch-1 decode with the SDK's split-key CUDA decode attention (the sdpa plugin's `cuda_decode:
# kernel`, now its default) in one call: the kernel's and the plugin's CUDA tests; the kernels of one compiled +
# captured step of bf16 with the Triton GEMV; then batch-1 decode (compiled + captured) of bf16 with cuBLAS,
# bf16 with the Triton GEMV and int8 under the default attention, and bf16 with the Triton GEMV under
# `cuda_decode: sdpa` (torch's SDPA, the earlier default) beside them; one process each, back to back.
#   bash bench/gpu.sh decodeattn16          (carry .engine-whl .test-whl; files go to bench/results/kernels16/splitk/)
WHEELS=".engine-whl .test-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8"
TAIL=12
step 150 pytest --no-header -rs -k "not interpreted" sdk/tests/test_decode_attention.py \
  plugins/attention/sdpa/tests/test_sdpa_cuda.py
gemv() { echo "{\"name\": \"$1\", \"options\": {\"cuda_kernel\": \"$2\"}}"; }
step 90 step_kernels --quant "$(gemv bf16 triton)" --output "$OUT/step-kernels-bf16-triton-decode-kernel.json"
for q in bf16:cublas:kernel bf16:triton:kernel int8:triton:kernel bf16:triton:sdpa; do
  IFS=: read -r name kernel attn <<< "$q"
  step 75 decode_modes --quant "$(gemv "$name" "$kernel")" \
    --attention "{\"name\": \"sdpa\", \"options\": {\"cuda_decode\": \"$attn\"}}" --batch-size 1 \
    --modes cudagraph+compile --new-tokens 64 --reps 3 --output "$OUT/decode-$name-$kernel-attn-$attn-b1.json"
done

# Issue 16, batch-1 decode attention: the step's kernels (step_kernels) of bf16 with the Triton GEMV under the
# sdpa plugin pinned to flash and to efficient (auto picks cuDNN at decode), then batch-1 decode (compiled +
# captured) of bf16 with cuBLAS, bf16 with the Triton GEMV and int8 with sdpa pinned to flash, and bf16 with
# the Triton GEMV under auto beside them; one process each, back to back in one call:
#   bash bench/gpu.sh attn16          (carry .engine-whl; files go to bench/results/kernels16/splitk/)
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8"
TAIL=14
sdpa() { echo "{\"name\": \"sdpa\", \"options\": {\"backend\": \"$1\"}}"; }
gemv() { echo "{\"name\": \"$1\", \"options\": {\"cuda_kernel\": \"$2\"}}"; }
for b in flash efficient; do
  step 120 step_kernels --quant "$(gemv bf16 triton)" --attention "$(sdpa $b)" \
    --output "$OUT/step-kernels-bf16-triton-$b.json"
done
for q in bf16:cublas:flash bf16:triton:flash int8:triton:flash bf16:triton:auto; do
  IFS=: read -r name kernel backend <<< "$q"
  step 75 decode_modes --quant "$(gemv "$name" "$kernel")" --attention "$(sdpa "$backend")" --batch-size 1 \
    --modes cudagraph+compile --new-tokens 64 --reps 3 --output "$OUT/decode-$name-$kernel-$backend-b1.json"
done

# Issue 16, batch-1 bf16 decode against the floor: the float plugin's bf16 with cuBLAS (the default) and with
# `cuda_kernel: triton` (one-row calls through the SDK's Triton GEMV), Qwen2-7B shape, compiled + captured, one
# process each, back to back in one call:
#   bash bench/gpu.sh bf16gemv          (carry .engine-whl; files go to bench/results/kernels16/)
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float"
step 70 decode_modes --quant bf16 --batch-size 1 --modes cudagraph+compile --new-tokens 64 --reps 2 \
  --output "$OUT/decode-bf16-cublas-b1.json"
step 70 decode_modes --quant '{"name": "bf16", "options": {"cuda_kernel": "triton"}}' --batch-size 1 \
  --modes cudagraph+compile --new-tokens 64 --reps 2 --output "$OUT/decode-bf16-triton-b1.json"

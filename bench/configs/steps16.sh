# Issue 16, where a batch-1 decode step's time goes: the kernels of one compiled + captured step of the
# Qwen2-7B shape (random weights) with their device time per step, for bf16 with cuBLAS, bf16 with the Triton
# GEMV and int8, one process each:
#   bash bench/gpu.sh steps16          (carry .engine-whl; files go to bench/results/kernels16/splitk/)
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8"
TAIL=30
for q in bf16:cublas bf16:triton int8:triton; do
  name=${q%%:*} kernel=${q#*:}
  step 150 step_kernels --quant "{\"name\": \"$name\", \"options\": {\"cuda_kernel\": \"$kernel\"}}" \
    --output "$OUT/step-kernels-$name-$kernel.json"
done

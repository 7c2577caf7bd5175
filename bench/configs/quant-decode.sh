# bench/h200_quant_decode.sh before (issues 6 and 7): int8 kernels at decode sizes (the plugin's Triton kernels
# and torchao's), 2:4 sparse layers, then decode of the Qwen2-7B shape per precision policy on the fused path
# (batch 1 compiled + captured, batch 8 captured), one process each.
WHEELS=".engine-whl .ao-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4 quant/fp8 pruning/magnitude
pruning/semi24"
step 150 int8_kernels --rows 1,8,16,32 --torchao-rows 1 --output "$OUT/int8-kernels-h200.json"
step 80 semi24_kernels --batch-size 32,128,512,2048,8192 --backends cusparselt,cutlass --output "$OUT/semi24-h200.json"
for q in bf16 int8 int4 fp8; do
  step 100 decode_modes --quant "$q" --batch-size 1,8 --modes cudagraph+compile --new-tokens 64 --reps 2 \
    --output "$OUT/quant-fused-$q.json"
done

# bench/h200_int8_final.sh before (issue 6): the int8 kernels, then bf16 against int8 decode of the Qwen2-7B
# shape on the fused path, batch 1 (compiled + captured) and 8 (captured), 3 reps each.
#   bash bench/gpu.sh int8-final [1]     (1: batch 1 only, kernels at one row, no torchao, files quant-fused-b1-*)
WHEELS=".engine-whl .ao-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8"
if [ "${1:-}" = 1 ]; then rows=1 ao_rows="" batches=1 prefix=quant-fused-b1; else
  rows=1,8 ao_rows=1 batches=1,8 prefix=quant-fused; fi
step 150 int8_kernels --rows "$rows" --torchao-rows "$ao_rows" --output "$OUT/int8-kernels-h200.json"
for q in bf16 int8; do
  step 110 decode_modes --quant "$q" --batch-size "$batches" --modes cudagraph+compile --new-tokens 64 --reps 3 \
    --output "$OUT/$prefix-$q.json"
done

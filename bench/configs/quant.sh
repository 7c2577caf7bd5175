# bench/h200_quant.sh before (issue 6): Qwen2-7B shape, random weights, each quant policy through
# `dsr1 bench --config`, prompt 128, 64 new tokens, one process per policy, graph eager.
#   bash bench/gpu.sh quant [BATCHES=1,8]
WHEELS=".engine-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4 quant/fp8 quant/w8a8"
for q in bf16 int8 int4 fp8 w8a8; do
  echo "{\"quant\": \"$q\", \"device\": \"cuda\"}" > "$OUT/config-$q.json"
  step 105 dsr1 bench --shape qwen2-7b --random-weights --config "$OUT/config-$q.json" --device cuda \
    --batch-size "${1:-1,8}" --prompt-len 128 --new-tokens 64 --reps 2 --output "$OUT/quant-h200-$q.json"
done

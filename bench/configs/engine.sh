# bench/h200.sh before: dsr1 against transformers on the Qwen2-7B shape, random bf16 weights, eager graph.
#   bash bench/gpu.sh engine [BATCHES=1,8,32,128] [REPS=2]
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda"
step 300 dsr1 bench --shape tiny-125m --random-weights --compare hf --device cuda --batch-size 1 \
  --prompt-len 16 --new-tokens 8 --reps 1  # smoke test
step 600 dsr1 bench --shape qwen2-7b --random-weights --compare hf --device cuda \
  --batch-size "${1:-1,8,32,128}" --prompt-len 128 --new-tokens 128 --reps "${2:-2}" \
  --output "$OUT/qwen2-7b-h200-b$(echo "${1:-all}" | tr , _).json"

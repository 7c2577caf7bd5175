# bench/h200_attention.sh before: one prefill attention call per plugin and length in bf16 (issue 4):
#   1. a Qwen2-7B layer's attention (28 query heads, 4 KV heads, head dim 128) and the whole decoder layer around
#      it (--layer), up to 65536 tokens; eager needs ~3 fp32 copies of the (28, T, T) scores, so it stops
#      fitting after 16384;
#   2. one KV group of it (7 query heads, 1 KV head) up to 32768, where eager still fits, so the linear/eager
#      target at 32768 is measured, not extrapolated.
# Make the PNGs afterwards: dsr1 bench attention --from-json bench/results/attention/h200.json --plot ....png
WHEELS=".engine-whl"
PLUGINS="attention/eager attention/sdpa attention/linear attention/sliding devices/cpu devices/cuda"
step 120 dsr1 bench attention --plugins eager,sdpa,linear,sliding --seq 64,256 --device cuda --reps 1  # smoke test
step 600 dsr1 bench attention --plugins eager,sdpa,linear,sliding --seq 1024,4096,8192,16384,32768,65536 \
  --device cuda --dtype bfloat16 --heads 28 --kv-heads 4 --head-dim 128 --ffn 18944 --layer --reps 5 \
  --timeout-s 120 --output "$OUT/h200.json"
step 600 dsr1 bench attention --plugins eager,sdpa,linear,sliding --seq 4096,8192,16384,32768 \
  --device cuda --dtype bfloat16 --heads 7 --kv-heads 1 --head-dim 128 --reps 5 --timeout-s 120 \
  --output "$OUT/h200-group.json"

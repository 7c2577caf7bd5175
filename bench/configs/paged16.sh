# Issue 16 on the H200, second call: the CUDA tests of the paged engine's graph plans and of the profiler; the
# profiler's overhead at 1/100 steps now that a sampled step times one layer's sub-blocks; the paged engine's
# decode with graph `adaptive` against its default capture (both loaded, rounds alternating).
#   bash bench/gpu.sh paged16
WHEELS=".engine-whl .bench-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda"
WORK=${WORK:-/tmp/dsr1-adaptive}
step 150 pytest --no-header -rs tests/engine/test_paged_graph_plans.py tests/engine/test_paged_fast_paths.py \
  tests/core/test_profiler.py -k cuda
step 120 profiler_overhead --shape qwen2-7b --work-dir "$WORK" --batch-size 1,16 --every 100 --new-tokens 32 \
  --reps 2 --rounds 4 --output "$OUT/profiler-overhead-h200-one-layer.json"
step 60 dsr1 profile --model "$WORK/qwen2-7b-bf16" --device cuda --dtype bfloat16 \
  --batch-size 1,8 --steps 16 --out "$OUT/profile-h200-one-layer"
step 240 paged_plans --shape qwen2-7b --rows 1,8,32 --prompt-len 128 --new-tokens 64 --rounds 3 \
  --output "$OUT/paged-plans-h200.json"

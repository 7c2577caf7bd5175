# Issue 16 on the H200: the CUDA tests of graph `adaptive` and monitor `profiler`, then the decode modes of the
# qwen2-7b shape (random bf16 weights) at batch 1, 8, 32 and 128 with `adaptive` beside each fixed plan, in one
# process (its row's adaptive_vs_best_fixed is the target's figure), then the profiler's overhead at 1/100 steps
# against `timing` (rounds alternating in one process) and `dsr1 profile` of the same shape.
#   bash bench/gpu.sh adaptive [PART]   PART: all (default), modes (tests + decode modes) or profile
WHEELS=".engine-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda"
part=${1:-all}
WORK=${WORK:-/tmp/dsr1-adaptive}
if [ "$part" = all ] || [ "$part" = modes ]; then
  step 90 pytest --no-header -rs tests/engine/test_graph_adaptive.py tests/core/test_profiler.py -k cuda
  step 300 decode_modes --shape qwen2-7b --batch-size 1,8,32,128 --prompt-len 64 --new-tokens 64 --reps 2 \
    --modes eager,cudagraph,cudagraph+compile,adaptive --output "$OUT/adaptive-h200.json"
fi
if [ "$part" = all ] || [ "$part" = profile ]; then
  step 100 profiler_overhead --shape qwen2-7b --work-dir "$WORK" --batch-size 1,16 --every 100 --new-tokens 32 \
    --reps 2 --rounds 3 --output "$OUT/profiler-overhead-h200.json"
  step 60 dsr1 profile --model "$WORK/qwen2-7b-bf16" --device cuda --dtype bfloat16 \
    --batch-size 1,8 --steps 16 --out "$OUT/profile-h200"
fi

# Rechecks after fixes, in one short call: `tiered` at a budget that holds everything (now read straight to the
# GPU) against `single` in alternating rounds; the profiler's overhead at 1/100 steps after its sampled step got
# cheaper; the CUDA tests of both.
#   bash bench/gpu.sh recheck
WHEELS=".engine-whl .bench-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda"
WORK=${WORK:-/tmp/dsr1-tiered}
step 150 tiered --shape qwen2-7b --work-dir "$WORK" --batch-size 1,16 --prompt-len 32 --new-tokens 16 --reps 2 \
  --budgets none --disk-row none --resident-pair 4 --output "$OUT/tiered-h200-resident-pair-direct.json"
step 90 profiler_overhead --shape qwen2-7b --work-dir "$WORK" --batch-size 1,16 --every 100 --new-tokens 32 \
  --reps 2 --rounds 3 --output "$OUT/profiler-overhead-h200-after.json"
step 60 pytest --no-header -rs tests/engine/test_pool_tiered.py tests/core/test_profiler.py -k cuda

# Issue 15 on the H200: the qwen2-7b shape (random bf16 weights, written once under $WORK) with the pool `tiered`
# at GPU budgets of 1.0 (against `single`: within 2 %), 0.5 and 0.25 of the weights (against accelerate's
# device_map="auto" with the same max_memory) at batch 1 and 16, and a disk row (GPU 0.25, host 0.25: the rest
# streams from disk), all in one process so the ratios share a machine state.
#   bash bench/gpu.sh tiered [PART] [BATCHES]   PART: all (default, one JSON), main (no disk row), disk (the
#   disk row and single only), cpu (the CUDA tests of the pool and the KV swap, then budgets 0.5 and 1.0, each
#   0.5 row again with device [cuda, cpu]: layers may run on the CPU) or disk-accelerate (the disk row with
#   accelerate's disk offload timed too,
#   after single and budget 1.0 loaded side by side and timed in alternating rounds); BATCHES: default 1,16. Split into parts when `all` does not fit a call.
# accelerate comes from .bench-whl (pip download accelerate==1.15.0 --no-deps -d .bench-whl; its own
# dependencies are on the machine); carry .bench-whl with the other wheel dirs.
WHEELS=".engine-whl .bench-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda"
part=${1:-all}
WORK=${WORK:-/tmp/dsr1-tiered}  # the checkpoint is reused while the machine stays warm
common=(--shape qwen2-7b --work-dir "$WORK" --batch-size "${2:-1,16}" --prompt-len 32 --new-tokens 16 --reps 2
        --compare accelerate)
case "$part" in
  all) step 580 tiered "${common[@]}" --budgets 1.0,0.5,0.25 --disk-row 0.25,0.25 --disk-batch-size 1 \
         --output "$OUT/tiered-h200.json" ;;
  main) step 580 tiered "${common[@]}" --budgets 1.0,0.5,0.25 --disk-row none --output "$OUT/tiered-h200.json" ;;
  disk) step 580 tiered "${common[@]}" --budgets none --disk-row 0.25,0.25 --disk-batch-size 1 \
          --output "$OUT/tiered-h200-disk.json" ;;
  cpu) step 150 pytest tests/engine/test_pool_tiered.py tests/engine/test_kv_swap.py -k cuda -rs
       step 430 tiered "${common[@]}" --budgets 0.5,1.0 --cpu-layers 0.5 --disk-row none \
         --output "$OUT/tiered-h200-cpu-layers.json" ;;
  disk-accelerate) step 200 tiered "${common[@]}" --budgets none --disk-row none --resident-pair 4 \
         --output "$OUT/tiered-h200-resident-pair.json"
       step 330 tiered "${common[@]}" --budgets none --disk-row 0.25,0.25 --batch-size 1 --disk-batch-size 1 \
         --accelerate-disk --new-tokens 4 --reps 1 --output "$OUT/tiered-h200-disk-accelerate.json" ;;
  *) echo "tiered.sh: PART is all, main, disk, cpu or disk-accelerate, got $part"; FAILED=$((FAILED + 1)) ;;
esac

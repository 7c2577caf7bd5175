# Every GPU module of the benchmark library and `dsr1 bench` on small shapes, in a few minutes: a check that the
# runner, the install and each benchmark still work on the lent machine, not a measurement.
#   bash bench/gpu.sh smoke
WHEELS=".engine-whl .serve-whl" TAIL=6
PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 pruning/magnitude pruning/semi24"
step 180 decode_modes --shape tiny-125m --batch-size 1,4 --modes eager,cudagraph --new-tokens 16 --reps 1 \
  --output "$OUT/smoke-decode-modes.json"
step 120 graph_reuse --shape tiny-125m --calls 2 --batch 4 --new-tokens 8 --output "$OUT/smoke-graph-reuse.json"
step 180 engine_loop --shape tiny-125m --only prefix --output "$OUT/smoke-engine-loop.json"
step 120 int8_kernels --rows 1 --torchao-rows "" --output "$OUT/smoke-int8-kernels.json"
step 120 semi24_kernels --batch-size 32 --backends cusparselt --output "$OUT/smoke-semi24.json"
step 120 gpu_profile --shape tiny-125m
step 300 serve_overhead --shape tiny-125m --rates 4:16 --num-blocks 1024 --output "$OUT/smoke-serve-overhead.json"
step 180 dsr1 bench --shape tiny-125m --random-weights --compare hf --device cuda --batch-size 1 --prompt-len 16 \
  --new-tokens 8 --reps 1 --output "$OUT/smoke-bench.json"

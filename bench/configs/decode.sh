# bench/h200_decode.sh before (issue 5): the CUDA tests of the decode graph, then decode modes on the same
# Qwen2-7B-shaped random bf16 weights in one process.
#   bash bench/gpu.sh decode [BATCHES=1,8,32,128] [COMPILED_BATCHES=1,128]
WHEELS=".engine-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4"
step 180 pytest tests/engine/test_decode_graph.py plugins/attention/sdpa
step 200 decode_modes --shape qwen2-7b --batch-size "${1:-1,8,32,128}" --modes eager,cudagraph \
  --new-tokens 128 --reps 2 --output "$OUT/decode-modes-h200.json"
step 300 decode_modes --shape qwen2-7b --batch-size "${2:-1,128}" --modes eager,cudagraph+compile \
  --new-tokens 128 --reps 2 --output "$OUT/decode-modes-compiled-h200.json"

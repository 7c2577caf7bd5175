# The engine-loop figures of issue 13 (bench/results/engine/README.md), on the Qwen2-7B shape. Each step needs a
# fresh machine's worth of time; run a part with `bash bench/gpu.sh engine-loop PART` (roofline, prefix, serve,
# paged), or all of them without an argument.
WHEELS=".engine-whl .serve-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda"
part=${1:-all}
if [ "$part" = all ] || [ "$part" = roofline ]; then
  step 600 engine_loop --shape qwen2-7b --output "$OUT/engine-h200.json"
fi
if [ "$part" = all ] || [ "$part" = prefix ]; then
  step 300 engine_loop --shape qwen2-7b --only prefix --output "$OUT/engine-prefix-h200.json"
fi
if [ "$part" = all ] || [ "$part" = serve ]; then
  step 600 dsr1 bench serve --shape qwen2-7b --device cuda --requests 512 --lengths uniform:64-1024,32-512 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --compare static --output "$OUT/serve-qwen2-7b-h200-512.json" \
    --plot "$OUT/serve-qwen2-7b-h200-512.png"
  step 600 dsr1 bench serve --shape qwen2-7b --device cuda --requests 256 --lengths uniform:64-1024,128-128 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --compare hf --output "$OUT/serve-qwen2-7b-h200-vs-hf.json"
fi
if [ "$part" = all ] || [ "$part" = paged ]; then
  step 600 paged_tune --output "$OUT/paged-tune-h200.json"
fi

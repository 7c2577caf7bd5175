# bench/h200_fused.sh before (issue 5): the seed's hardware YAML end to end (type nvidia), greedy identity of
# every decode mode on a trained model (dsr1-tiny, bf16), and `dsr1 bench --compare hf` on the Qwen2-7B shape
# with the fused decode path (graph cudagraph + compile).
#   bash bench/gpu.sh fused [BATCHES=1,8,32,128]
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4"
step 60 dsr1 config check examples/hardware-nvidia.yaml
STDOUT="$OUT/generate-hardware-nvidia.json" step 120 dsr1 generate --config examples/hardware-nvidia.yaml \
  --model dsr1-tiny --max-new-tokens 40 --seed 0 --json "The Python interpreter"
step 150 decode_modes --model dsr1-tiny --batch-size 1,8 --new-tokens 200 --reps 2 \
  --output "$OUT/decode-modes-dsr1-tiny-h200.json"
step 420 dsr1 bench --shape qwen2-7b --random-weights --compare hf --device cuda \
  --config bench/configs/fused-fixed-tiling.json \
  --batch-size "${1:-1,8,32,128}" --prompt-len 128 --new-tokens 128 --reps 2 --output "$OUT/qwen2-7b-h200-fused.json"

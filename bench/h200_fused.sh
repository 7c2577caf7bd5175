#!/usr/bin/env bash
# Issue 5's fused-decode figures on the lent H200, one command: the seed's hardware YAML end to end
# (type nvidia), greedy identity of every decode mode on a trained model (dsr1-tiny, bf16), and
# `dsr1 bench --compare hf` on Qwen2-7B-shaped random weights with the fused decode path
# (graph cudagraph + compile, which kernel_fusion: true selects on nvidia). JSON lands in $OUT.
set -uo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m dsr1.cli config check examples/hardware-nvidia.yaml
timeout 120 python3 -m dsr1.cli generate --config examples/hardware-nvidia.yaml --model dsr1-tiny \
  --max-new-tokens 40 --seed 0 --json "The Python interpreter" | tee "$OUT/generate-hardware-nvidia.json"
echo
timeout 150 python3 bench/h200_decode.py --model dsr1-tiny --batch-size 1,8 --new-tokens 200 --reps 2 \
  --output "$OUT/decode-modes-dsr1-tiny-h200.json" 2>&1 | grep -v Warning
echo '{"device": "cuda", "graph": {"name": "cudagraph", "options": {"compile": true, "tiling_strategy": "fixed"}}}' > /tmp/fused.json
timeout 420 python3 -m dsr1.cli bench --shape qwen2-7b --random-weights --compare hf --device cuda --config /tmp/fused.json \
  --batch-size "${1:-1,8,32,128}" --prompt-len 128 --new-tokens 128 --reps 2 \
  --output "$OUT/qwen2-7b-h200-fused.json" 2>&1 | grep -v Warning | tail -n 20

#!/usr/bin/env bash
# Quant policies on the H200 (issue 6), one command on the lent GPU machine: Qwen2-7B-shaped random
# weights, bf16 baseline and each policy through `dsr1 bench --config`, batch sizes $1 (default 1,8),
# prompt 128, 64 new tokens. Each run is its own process; all run back to back in this one script.
set -uo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4 ./plugins/quant/fp8 ./plugins/quant/w8a8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for q in bf16 int8 int4 fp8 w8a8; do
  echo "{\"quant\": \"$q\", \"device\": \"cuda\"}" > /tmp/$q.json
  timeout 105 python3 -m dsr1.cli bench --shape qwen2-7b --random-weights --config /tmp/$q.json --device cuda \
    --batch-size "${1:-1,8}" --prompt-len 128 --new-tokens 64 --reps 2 \
    --output "$OUT/quant-h200-$q.json" 2>&1 | tail -n 12 || echo "$q: failed or timed out"
done

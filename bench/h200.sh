#!/usr/bin/env bash
# The H200 run of the engine issue, one command on the lent GPU machine (no registry there):
# install the carried wheels and this repo (core, SDK, sdpa, cpu/cuda devices) into /tmp/site,
# check the path on a small shape, then measure Qwen2-7B-shaped random bf16 weights against
# transformers at batch sizes $1 (default 1,8,32,128), $2 timed repetitions (default 2). JSON lands in $OUT.
set -euo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda
cd /tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m dsr1.cli bench --shape tiny-125m --random-weights --compare hf --device cuda --batch-size 1 \
  --prompt-len 16 --new-tokens 8 --reps 1
python3 -m dsr1.cli bench --shape qwen2-7b --random-weights --compare hf --device cuda \
  --batch-size "${1:-1,8,32,128}" --prompt-len 128 --new-tokens 128 --reps "${2:-2}" \
  --output "$OUT/qwen2-7b-h200-b$(echo "${1:-all}" | tr , _).json"

#!/usr/bin/env bash
# The H200 run of issue 4's attention measurement, one command on the lent GPU machine (no registry
# there): install the carried wheels and this repo (core, SDK, the four attention plugins, cpu/cuda
# devices) into /tmp/site, then time one prefill attention call per plugin and length in bf16:
#   1. a Qwen2-7B layer's attention (28 query heads, 4 KV heads, head dim 128), and the whole decoder layer
#      around it (--layer: norms, qkv/rope, o_proj, FFN 18944; random weights), up to 65536 tokens;
#      eager needs ~3 fp32 copies of the (28, T, T) scores, so it stops fitting after 16384;
#   2. one KV group of it (7 query heads, 1 KV head) up to 32768, where eager still fits, so the
#      linear/eager target at 32768 is measured, not extrapolated (every plugin's memory is linear in heads).
# JSON lands in $OUT (h200.json, h200-group.json); make the PNGs here afterwards with
#   dsr1 bench attention --from-json bench/results/attention/h200.json --plot bench/results/attention/h200.png
set -euo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/eager ./plugins/attention/sdpa \
  ./plugins/attention/linear ./plugins/attention/sliding ./plugins/devices/cpu ./plugins/devices/cuda
cd /tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
PLUGINS=eager,sdpa,linear,sliding
python3 -m dsr1.cli bench attention --plugins "$PLUGINS" --seq 64,256 --device cuda --reps 1  # smoke test
python3 -m dsr1.cli bench attention --plugins "$PLUGINS" --seq 1024,4096,8192,16384,32768,65536 \
  --device cuda --dtype bfloat16 --heads 28 --kv-heads 4 --head-dim 128 --ffn 18944 --layer --reps 5 \
  --timeout-s 120 --output "$OUT/h200.json"
python3 -m dsr1.cli bench attention --plugins "$PLUGINS" --seq 4096,8192,16384,32768 \
  --device cuda --dtype bfloat16 --heads 7 --kv-heads 1 --head-dim 128 --reps 5 --timeout-s 120 \
  --output "$OUT/h200-group.json"

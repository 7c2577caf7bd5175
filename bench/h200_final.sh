#!/usr/bin/env bash
# The last H200 call of the 2026-11-29 session, one command: (1) the fused decode bench against
# transformers (issue 5), (2) int8/int4 against bf16 on the fused path at batch 1 (issue 6), (3) 2:4
# sparse linear layers (issue 7), (4) the attention memory bench (issue 4), each under its own timeout.
set -uo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/eager ./plugins/attention/sdpa \
  ./plugins/attention/linear ./plugins/attention/sliding ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4 ./plugins/pruning/magnitude \
  ./plugins/pruning/semi24
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo '{"device": "cuda", "graph": {"name": "cudagraph", "options": {"compile": true}}}' > /tmp/fused.json
timeout 240 python3 -m dsr1.cli bench --shape qwen2-7b --random-weights --compare hf --device cuda --config /tmp/fused.json \
  --batch-size 1,8,32,128 --prompt-len 128 --new-tokens 128 --reps 1 \
  --output "$OUT/qwen2-7b-h200-fused.json" 2>&1 | grep -v Warning | tail -n 9
for q in bf16 int8 int4; do
  timeout 70 python3 bench/h200_decode.py --quant "$q" --batch-size 1 --modes cudagraph+compile --new-tokens 64 \
    --reps 2 --output "$OUT/quant-fused-$q.json" 2>&1 | grep -E "^batch|Error|error" | tail -n 3
done
timeout 35 python3 bench/h200_semi24.py --batch-size 1,32,128,512 --output "$OUT/semi24-h200.json" 2>&1 | tail -n 16
cd /tmp && timeout 60 python3 -m dsr1.cli bench attention --plugins eager,sdpa,linear,sliding \
  --seq 1024,4096,8192,16384,32768 --device cuda --dtype bfloat16 --heads 7 --kv-heads 1 --head-dim 128 \
  --reps 3 --timeout-s 60 --output "$OUT/attention-h200-group.json" 2>&1 | tail -n 25

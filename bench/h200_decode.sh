#!/usr/bin/env bash
# Issue 5 on the lent H200, one command (no registry there): install the carried wheels and this repo
# into /tmp/site, run the CUDA tests of the decode graph, then compare decode modes on Qwen2-7B-shaped
# random bf16 weights in one process (bench/h200_decode.py). JSON lands in $OUT.
#   bash bench/h200_decode.sh [BATCHES=1,8,32,128] [COMPILED_BATCHES=1,128]
set -uo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/engine/test_decode_graph.py plugins/attention/sdpa 2>&1 | tail -n 15
timeout 200 python3 bench/h200_decode.py --shape qwen2-7b --batch-size "${1:-1,8,32,128}" --modes eager,cudagraph \
  --new-tokens 128 --reps 2 --output "$OUT/decode-modes-h200.json" 2>&1 | grep -v Warning
timeout 300 python3 bench/h200_decode.py --shape qwen2-7b --batch-size "${2:-1,128}" --modes eager,cudagraph+compile \
  --new-tokens 128 --reps 2 --output "$OUT/decode-modes-compiled-h200.json" 2>&1 | tail -n 30

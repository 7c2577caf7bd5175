#!/usr/bin/env bash
# The CUDA-only tests on the H200 (2026-11-29, third session): the int8 Triton kernels, the CUDA device
# plugin, the decode graph, sdpa on CUDA, int4/fp8/semi24 CUDA paths. Needs carry: .engine-whl, .test-whl.
set -uo pipefail
. bench/h200_install.sh ".engine-whl .test-whl" ./plugins/attention/eager ./plugins/attention/sdpa \
  ./plugins/devices/cpu ./plugins/devices/cuda ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4 \
  ./plugins/quant/fp8 ./plugins/pruning/magnitude ./plugins/pruning/semi24
timeout 200 python3 -m pytest -q -p no:cacheprovider --no-header -rs -k "not interpreter" \
  plugins/quant/int8/tests/test_int8.py plugins/devices/cuda/tests tests/engine/test_decode_graph.py \
  plugins/attention/sdpa/tests/test_sdpa_cuda.py plugins/quant/int4/tests plugins/quant/fp8/tests \
  plugins/pruning/semi24/tests 2>&1 | tail -n 40

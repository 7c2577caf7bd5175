# On the lent H200 (no registry there): install the carried wheels and dsr1, then bench/h200_serve.py.
#   run: bash bench/h200_serve.sh   (carry .engine-whl .serve-whl)
set -uo pipefail
rm -rf /tmp/site
. bench/h200_install.sh ".engine-whl .serve-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv,noheader
timeout 570 python3 bench/h200_serve.py --rates 1:24,4:96,16:256,inf:256 --switch-intervals none,0.0005 --output "$OUT/serve-h200.json" 2>&1 \
  | grep -v -i warning | tail -n 30

# bench/h200_serve.sh before (issue 14): `dsr1 serve` over HTTP against the in-process engine on the same traces.
WHEELS=".engine-whl .serve-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float"
TAIL=30
step 570 serve_overhead --rates 1:24,4:96,16:256,inf:256 --switch-intervals none,0.0005 \
  --output "$OUT/serve-h200.json"

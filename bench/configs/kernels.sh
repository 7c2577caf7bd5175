# bench/h200_kernels.sh before: int8 weight-only kernels incl. the plugin's Triton kernels and torchao's
# (issue 6), then 2:4 sparse linear layers with both sparse back ends and a CUDA-graph timer (issue 7).
WHEELS=".engine-whl .ao-whl" PLUGINS="quant/int8 pruning/magnitude pruning/semi24"
TAIL=30
step 240 int8_kernels --rows 1,8,16,32,64 --torchao-rows 1,8 --output "$OUT/int8-kernels-h200.json"
step 150 semi24_kernels --batch-size 32,128,512,2048,8192 --output "$OUT/semi24-h200.json"

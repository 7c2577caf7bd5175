# bench/h200_gpu_tests.sh before: the CUDA-only tests (int8 Triton kernels, the CUDA device plugin, the decode
# graph, sdpa on CUDA, int4/fp8/semi24 CUDA paths).
WHEELS=".engine-whl .test-whl"
PLUGINS="attention/eager attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4 quant/fp8
pruning/magnitude pruning/semi24"
TAIL=40
step 200 pytest --no-header -rs -k "not interpreter" plugins/quant/int8/tests/test_int8.py plugins/devices/cuda/tests \
  tests/engine/test_decode_graph.py plugins/attention/sdpa/tests/test_sdpa_cuda.py plugins/quant/int4/tests \
  plugins/quant/fp8/tests plugins/pruning/semi24/tests

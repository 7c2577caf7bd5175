"""dsr1's benchmark library: every measuring function, with public names.

``dsr1 bench`` (:mod:`dsr1.commands.bench`) only parses options and calls in here; the other
modules run as ``python -m dsr1.benchmarks.NAME --help``. On the lent GPU machine
``bash bench/gpu.sh`` installs dsr1 and runs them (``bench/README.md``).

Shared pieces:

* :mod:`.common` - machine, versions and date of a report, list options, peak memory, CPU load,
  streaming bandwidth, :func:`~.common.random_model`;
* :mod:`.shapes` - the built-in model shapes and :class:`~.shapes.RandomWeights`;
* :mod:`.rates` - tokens per second from timed generate calls, refusing timings that cannot be real;
* :mod:`.cuda_timing` - CUDA-event and CUDA-graph timers, one decode-rate helper, the Qwen2-7B linear shapes.
* :mod:`.trace` - request traces (drawn or read), their prompts, percentiles and the plot of a replay.

``dsr1 bench`` and its forms:

* :mod:`.throughput` - ``dsr1 bench``: prefill / decode tok/s and peak memory against transformers;
* :mod:`.attention`, :mod:`.kvcache`, :mod:`.serve` (with :mod:`.serve_hf`, :mod:`.serve_http`),
  :mod:`.precision` - ``dsr1 bench attention`` / ``kvcache`` / ``serve`` / ``precision``.

Modules run with ``python -m``:

* :mod:`.engine_loop` - decode-step roofline, batch-1 decode, prefix-cache TTFT (CUDA);
* :mod:`.serve_overhead` - ``dsr1 serve`` over HTTP against the in-process engine, same traces;
* :mod:`.paged_tune` - the paged Triton kernel over launch settings, profiles of one step (CUDA);
* :mod:`.decode_modes` - eager / captured / compiled decode on one set of weights (CUDA);
* :mod:`.tiered` - the ``tiered`` pool's decode against ``single`` and accelerate's ``device_map`` (CUDA, CPU);
* :mod:`.graph_reuse` - successive captured generates on one model (CUDA);
* :mod:`.int8_kernels`, :mod:`.semi24_kernels` - int8 weight-only and 2:4 sparse matmuls (CUDA);
* :mod:`.gpu_profile` - a profile of one prefill (CUDA);
* :mod:`.pdl_probe` - programmatic dependent launch in a captured chain of one-row GEMVs (CUDA, Hopper);
* :mod:`.cpu_linear_kernels`, :mod:`.quant_kernels_cpu` - CPU matmul kernels by layout and precision;
* :mod:`.cpu_decode_ops` - a CPU decode step's operators under ``torch.profiler`` (the sdpa plugin's
  ``cpu_decode`` settings side by side);
* :mod:`.kernel_sass` - a Triton kernel compiled for a GPU this machine lacks: registers, shared memory, each
  loop's SASS opcodes;
* :mod:`.quant` - accuracy and CPU speed of the quant policies;
* :mod:`.pruning_speed` - a pruned stage against its dense model (also what ``dsr1 prune`` measures with);
* :mod:`.pruning_runs` - every committed ``dsr1 prune`` run and speed check.
"""

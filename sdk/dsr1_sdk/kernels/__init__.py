"""Device kernels that plugins of several families share.

* :mod:`dsr1_sdk.kernels.weight_only` - weight-only matmuls for decode-sized calls on CUDA, as Triton
  kernels: int8 per channel, int4 two per byte with group-wise scales and zeros, fp8 e4m3 per channel
  (dequantized in registers, activations stay in the compute dtype) and bf16/fp16 itself. One row runs
  a GEMV, 2 to :data:`MAX_ROWS` rows a ``tl.dot`` kernel; split-K is a tuning axis. The int8, int4 and
  fp8 quant plugins call it for ``cuda_kernel: triton``.

* :mod:`dsr1_sdk.kernels.decode_attention` - one-query attention over a KV cache on CUDA, as a Triton
  kernel that splits each head's keys across the GPU and merges the parts in the same launch. The sdpa
  plugin calls it for ``cuda_decode: kernel``.

* :mod:`dsr1_sdk.kernels.cpu` - weight-only GEMV for decode-sized calls on the CPU, as a C++ extension
  compiled at first use (cached per torch build; ``python -m dsr1_sdk.kernels.cpu`` builds it ahead):
  int8 per channel, bf16, fp16 and fp32 weights read once per call and converted in registers, with
  AVX-512, AVX2 and plain C++ paths picked at run time; and ``stream_read``, the plain streaming read
  the benchmarks' bandwidth floor includes. The int8, fp16 and bf16 quant plugins call it on the CPU.

Importing this package is cheap (no triton). ``weight_only`` and ``decode_attention`` import triton, so a
plugin imports them on its first CUDA call. :func:`triton_problem` says whether it can (without importing triton).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

__all__ = ["FORMATS", "INTERPRETER_CASES", "MAX_ROWS", "patch_interpreter", "run_interpreted", "split_workspace",
           "triton_problem"]

#: most rows (tokens) a weight-only call takes; more rows are compute-bound: dequantize + cuBLAS wins.
MAX_ROWS = 64
#: the weight formats of :func:`dsr1_sdk.kernels.weight_only.weight_only_mm`.
FORMATS = ("int8", "int4", "fp8", "bf16")


def triton_problem(owner: str) -> str | None:
    """Why ``owner``'s (``"int8 cuda_kernel 'triton'"`` ...) Triton kernels cannot load here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return f"{owner} needs the triton package (pip install triton; CUDA builds of torch ship it)"
    return None


#: what the CPU tests run each format through in Triton's interpreter: (rows, config) for the GEMV and the dot
#: kernel, each without and with split-K (a split that leaves the last program past K, so masks are hit too).
INTERPRETER_CASES: tuple[tuple[int, dict[str, int]], ...] = (
    (1, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}),
    (1, {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3}),
    (3, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}),
    (3, {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3}),
)


#: (device, stream, the caller's key) → the partials and counters of a split kernel (:func:`split_workspace`).
_SPLIT_WORKSPACES: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def split_workspace(device: Any, key: tuple[Any, ...], partials: int, counters: int) -> tuple[Any, Any]:
    """The scratch of a kernel that splits a reduction across programs and lets the last one merge (the weight-only
    GEMV's split-K, the decode attention's key chunks): ``partials`` fp32 values, left unset, and ``counters``
    int32 at 0, which the merging program puts back to 0. Made once per device, stream and ``key`` (which must
    fix both sizes) and never replaced, so a captured CUDA graph keeps its pointers valid; two calls share
    one only on one stream, where they run in order."""
    import torch

    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    full = (str(device), stream, *key)
    found = _SPLIT_WORKSPACES.get(full)
    if found is None:
        found = _SPLIT_WORKSPACES[full] = (torch.empty(partials, dtype=torch.float32, device=device),
                                           torch.zeros(counters, dtype=torch.int32, device=device))
    return found


def patch_interpreter() -> None:
    """Triton 3.6's interpreter indexes with ``int(array)`` on the 1-element array a scalar argument becomes,
    which numpy ≥ 2.3 refuses (``range(0, iters)`` fails); read its one element instead (3.9 is unaffected)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "dsr1_patched", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.dsr1_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def run_interpreted(code: str, timeout: float = 300) -> str:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (it must be set before triton is imported, so
    not in the test's own process) and return its standard output; a failure raises with its stderr's tail."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    if out.returncode != 0:
        raise AssertionError(f"interpreted kernel run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout

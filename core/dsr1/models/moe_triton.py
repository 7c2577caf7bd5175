"""Quantized MoE experts on CUDA: one Triton matrix-vector kernel over the chosen experts' rows.

Int8 or e4m3 expert stacks (:meth:`dsr1.models.moe.Experts.quantize_`) have no grouped GEMM; this
kernel gives each program one (token, expert) pair and a slice of its expert's output rows,
reads those quantized rows once and applies the row scales in registers (a pair that repeats an
expert reads it again: fine at decode sizes, :data:`dsr1.models.moe.GEMV_MAX_PAIRS`). Registered
as a torch custom op, so ``torch.compile`` and CUDA-graph capture treat it as one opaque kernel.
Its oracle is :meth:`dsr1.models.moe.Experts.reference`; the tests run it in Triton's interpreter
on the CPU (``TRITON_INTERPRET=1``) and on CUDA where there is one. It has not been timed on a GPU.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

#: output rows per program and input columns per loop step (many programs: all SMs stream at once).
BLOCK_N = 16
BLOCK_K = 512


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def moe_gemv(x_ptr, ids_ptr, w_ptr, s_ptr, y_ptr,
                 N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SCALED: tl.constexpr):
        p = tl.program_id(0)  # the (token, expert) pair
        nb = tl.program_id(1)  # the block of output rows
        e = tl.load(ids_ptr + p).to(tl.int64)
        rows = nb * BN + tl.arange(0, BN)  # (BN,)
        cols = tl.arange(0, BK)  # (BK,)
        acc = tl.zeros((BN,), tl.float32)
        base = w_ptr + e * N * K  # expert e's (N, K) weight, row-major
        for k0 in range(0, K, BK):
            c = k0 + cols
            x = tl.load(x_ptr + p * K + c, mask=c < K, other=0.0).to(tl.float32)  # (BK,)
            w = tl.load(base + rows[:, None] * K + c[None, :], mask=(rows[:, None] < N) & (c[None, :] < K),
                        other=0.0).to(tl.float32)  # (BN, BK)
            acc += tl.sum(w * x[None, :], axis=1)
        if SCALED:  # int8 rows: one scale per output row of the expert
            acc *= tl.load(s_ptr + e * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + p * N + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)

    return moe_gemv


@torch.library.custom_op("dsr1::moe_gemv", mutates_args=())
def moe_gemv(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(P, K)`` times the ``(N, K)`` weight of expert ``ids[p]`` of ``weight`` ``(E, N, K)`` → ``(P, N)``;
    with ``scale`` ``(E, N)`` the weight is int8 and row ``n`` of expert ``e`` is ``weight[e, n] * scale[e, n]``."""
    import triton

    p, k = x.shape
    n = weight.shape[1]
    y = torch.empty((p, n), dtype=x.dtype, device=x.device)
    grid = (p, triton.cdiv(n, BLOCK_N))
    _kernel()[grid](x.contiguous(), ids.contiguous(), weight, weight if scale is None else scale, y, N=n, K=k,
                    BN=BLOCK_N, BK=BLOCK_K, SCALED=scale is not None)
    return y


@moe_gemv.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[1]))


@functools.cache
def available() -> bool:
    """Triton is importable (the kernel needs it and a CUDA device)."""
    try:
        import triton  # noqa: F401 - only whether it is there
    except ImportError:
        return False
    return True

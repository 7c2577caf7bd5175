"""The int8 weight-only matmul for decode-sized calls on CUDA, as Triton kernels.

``y (M, N) = x (M, K) · (qweight (N, K) · scales (N,))ᵀ``: at decode the cost of a linear layer
is reading its weight, so a kernel that reads the int8 bytes and converts them to floats in
registers moves half of what a bf16 matmul moves. Neither of torch's own paths does that on the
H200: ``F.linear(x, qweight.to(bf16))`` writes the bf16 weight to memory first, and
``aten._weight_int8pack_mm`` is slower still (``bench/results/quant-h200/``).

* :func:`_gemv_kernel` (one row of ``x``): each program owns ``BLOCK_N`` output channels and
  walks ``K``, accumulating ``w · x`` elementwise into a ``(BLOCK_N, BLOCK_K)`` fp32 tile that is
  summed once at the end (no tensor cores: a matrix-vector product has nothing for them to do).
  The weight becomes fp32 through :func:`_int8_to_fp32`, integer and float adds instead of the
  int-to-float conversion whose throughput capped the first version at ~3 TB/s.
* :func:`_dot_kernel` (2 to :data:`MAX_ROWS` rows): the same walk with ``tl.dot`` on a
  ``(BLOCK_M, BLOCK_K) × (BLOCK_K, BLOCK_N)`` tile, the weight converted to the activation
  dtype in registers; each weight tile is read once for all rows.

Both are autotuned per ``(M, N, K)`` on the first call (the decode graph's warm-up steps run
before capture, so capture replays tuned kernels). :func:`weight_only_mm` is a
``torch.library`` custom op: ``torch.compile`` keeps it as one opaque call.

This module imports triton; the plugin imports it only when a CUDA layer uses ``cuda_kernel:
triton``. Setting ``TRITON_INTERPRET=1`` before import runs the kernels on CPU tensors through
Triton's interpreter (the CPU test suite checks them that way).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "weight_only_mm"]

#: most rows (tokens) a call may have; more rows are compute-bound and go to dequantize + cuBLAS.
MAX_ROWS = 64

#: (BLOCK_N, BLOCK_K, warps, stages): few rows and long K slices (many programs even for 3584-row
#: layers, as inductor's reductions do) up to wide tiles for the 152k-row output head.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(1, 256, 2, 1), (1, 512, 2, 1), (1, 512, 4, 1), (1, 1024, 4, 1), (1, 1024, 4, 2),
                          (1, 2048, 8, 1), (1, 2048, 4, 2), (1, 4096, 8, 1), (1, 4096, 16, 1), (2, 512, 2, 1),
                          (2, 512, 4, 1), (2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 4, 3), (2, 2048, 8, 1),
                          (2, 2048, 8, 2), (4, 512, 4, 1), (4, 512, 4, 3), (4, 1024, 4, 3), (4, 1024, 8, 1),
                          (4, 2048, 8, 2), (8, 256, 4, 4), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 3),
                          (16, 512, 8, 3), (32, 256, 4, 3), (32, 512, 8, 2)]
]

#: (BLOCK_N, BLOCK_K, warps, stages) for the tensor-core kernel; BLOCK_M follows the rows.
_DOT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (32, 512, 4, 3),
                          (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 256, 8, 3)]
]
#: whether K and N need no bounds masks (the tile divides them): unmasked loads vectorize best.
_EVEN = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}


@triton.jit
def _int8_to_fp32(w):
    """int8 → fp32 without int-to-float conversions (16 per clock per SM on sm80/sm90, the limit of a
    plain ``w.to(tl.float32)`` GEMV): the bits ``0x4B000080 + q`` are the float ``2²³ + 128 + q``, exact
    for every int8 ``q``; subtracting ``2²³ + 128`` leaves ``q``. One integer add and one float add."""
    bits = w.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # (BLOCK_N, 1) row starts
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        if EVEN_K and EVEN_N:
            x = tl.load(x_ptr + offs_k).to(tl.float32)  # (BLOCK_K,)
            w = tl.load(w_rows + offs_k[None, :])  # (BLOCK_N, BLOCK_K) int8
        else:
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += _int8_to_fp32(w) * x[None, :]
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale  # (BLOCK_N,)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None] * K  # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K  # (1, BLOCK_N): weight row n is column n of wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K and EVEN_N:
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_cols + offs_k[:, None])  # (BLOCK_K, BLOCK_N) int8
        else:
            k_mask = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc * scale[None, :]  # (BLOCK_M, BLOCK_N)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


#: Triton's interpreter (``TRITON_INTERPRET=1``) cannot benchmark configs: it runs one fixed config.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_gemv = triton.heuristics(_EVEN)(_gemv_kernel)
_dot = triton.heuristics(_EVEN)(_dot_kernel)
if not _INTERPRET:
    _gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"])(_gemv)
    _dot = triton.autotune(configs=_DOT_CONFIGS, key=["M", "N", "K"])(_dot)
_FIXED = {"BLOCK_N": 16, "BLOCK_K": 64} if _INTERPRET else {}


def _block_m(rows: int) -> int:
    """Rows per dot tile: the power of two ≥ ``rows``, at least 16 (``tl.dot``'s minimum), at most 64."""
    return min(max(16, triton.next_power_of_2(rows)), MAX_ROWS)


@torch.library.custom_op("dsr1_int8::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (M, K)`` fp16/bf16, ``qweight (N, K)`` int8 contiguous, ``scales (N,)`` → ``(M, N)`` in ``x.dtype``.

    ``M`` at most :data:`MAX_ROWS`. The kernels index rows as ``row · K``: a strided ``x`` (a slice
    of a wider tensor) is copied first; the weight and scales are buffers, contiguous as stored.
    """
    x = x.contiguous()
    if not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("weight_only_mm needs a contiguous qweight and scales")
    m, k = x.shape
    n = qweight.shape[0]
    if m > MAX_ROWS or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"weight_only_mm takes at most {MAX_ROWS} fp16/bf16 rows, got {m} {x.dtype} rows")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 1:
        _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, qweight, scales, y, n, k, **_FIXED)
    else:
        block_m = _block_m(m)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))
        _dot[grid](x, qweight, scales, y, m, n, k, BLOCK_M=block_m, **_FIXED)
    return y


@weight_only_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))

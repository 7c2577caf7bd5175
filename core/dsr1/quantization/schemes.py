"""Quantization math shared by the quant plugins: weights to integers (or fp8) and back.

A linear weight is ``(out, in)``: "per channel" means one scale per output row, "group-wise"
one scale (and zero) per ``group`` consecutive input columns of a row. Every function here
is plain torch on any device, and is the *reference* of what the kernels compute: the
plugins' ``quantize_tensor`` round trips call these, and the kernels consume their outputs.

Scales are rounded *up* to the dtype the kernel reads them in (``scale_dtype``), so the
largest magnitude of a row never clips and the round-trip error stays within half a step.
"""
from __future__ import annotations

import torch

INT8_QMAX = 127
INT4_LEVELS = 15  # unsigned 0..15; the kernels subtract 8
FP8_E4M3_MAX = 448.0


def round_up_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (fp32) as ``dtype``, rounded up where rounding to nearest went below it."""
    out = value.to(dtype)
    low = out.float() < value
    if bool(low.any()):
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    return out


def _eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (0 for integers): the slack of returning in that dtype."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as fp32 ``(rows, in)``: every leading dim is an output channel."""
    w = weight.detach().float()
    w = w.reshape(1, -1) if w.dim() < 2 else w.reshape(-1, w.shape[-1])
    return w.contiguous()  # a transposed (kn-layout) weight view becomes row-major


# --- int8, symmetric, per output channel -------------------------------------------------------


def int8_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` int8 ``(out, in)`` in ``[-127, 127]`` and ``scale`` ``(out,)`` in ``scale_dtype``.

    ``scale ≥ max|w| / 127`` per row (1 for an all-zero row); ``w ≈ q * scale``.
    """
    w = _rows(weight)  # (out, in) fp32
    amax = w.abs().amax(dim=-1)  # (out,)
    scale = round_up_to(torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax)), scale_dtype)  # (out,)
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -INT8_QMAX, INT8_QMAX).to(torch.int8)  # (out, in)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` per row, fp32 ``(out, in)``."""
    return q.float() * scale.float()[:, None]


def int8_error_bound(weight: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Half a step of each row plus fp32 rounding slack; broadcastable to ``weight`` ``(out, 1)``."""
    w = _rows(weight)
    _, scale = int8_per_channel(weight, scale_dtype)
    amax = w.abs().amax(dim=-1)
    eps = max(_eps(weight.dtype), torch.finfo(torch.float32).eps)
    bound = scale.double() / 2 + 4 * amax.double() * eps  # (out,)
    return bound.reshape(*weight.shape[:-1], 1) if weight.dim() >= 2 else bound.reshape(1)


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: ``(M, K)`` → int8 ``(M, K)`` and fp32 scales ``(M, 1)``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_QMAX).clamp_min(1e-12)  # (M, 1)
    return torch.clamp(torch.round(xf / scale), -INT8_QMAX, INT8_QMAX).to(torch.int8), scale


# --- int4, asymmetric, group-wise (tinygemm convention: w = (q - 8) * scale + zero) -------------


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``(out, in)`` → ``(out, ceil(in / group), group)``; a partial last group repeats its last column."""
    pad = -w.shape[-1] % group
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=-1)
    return w.reshape(w.shape[0], -1, group)


def int4_groupwise(
    weight: torch.Tensor, group: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` uint8 ``(out, in)`` in ``[0, 15]``, ``scale`` and ``zero`` ``(out, ngroups)`` in ``scale_dtype``.

    ``scale ≥ (max - min) / 15`` per group, ``zero = min + 8 · scale`` rounded to ``scale_dtype``,
    ``q = round((w - zero) / scale) + 8``; dequantized ``(q - 8) · scale + zero``.
    """
    w = _rows(weight)  # (out, in)
    g = _groups(w, group)  # (out, G, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, G)
    scale = round_up_to(((hi - lo) / INT4_LEVELS).clamp_min(1e-8), scale_dtype)  # (out, G)
    zero = (lo + 8 * scale.float()).to(scale_dtype)  # (out, G)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp(0, INT4_LEVELS).to(torch.uint8).reshape(w.shape[0], -1)[:, : w.shape[1]]  # (out, in)
    return q, scale, zero


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``(q - 8) · scale + zero`` with each group's scale and zero, fp32 ``(out, in)``."""
    cols = q.shape[-1]
    s = scale.float().repeat_interleave(group, dim=-1)[:, :cols]  # (out, in)
    z = zero.float().repeat_interleave(group, dim=-1)[:, :cols]
    return (q.float() - 8) * s + z


def int4_error_bound(weight: torch.Tensor, group: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Half a step of each group, plus how far rounding ``zero`` moved the grid, plus fp32 slack."""
    w = _rows(weight)
    _, scale, zero = int4_groupwise(weight, group, scale_dtype)
    g = _groups(w, group)
    lo = g.amin(dim=-1)
    shift = (zero.double() - (lo.double() + 8 * scale.double())).abs()  # (out, G)
    amax = g.abs().amax(dim=-1).double()
    eps = max(_eps(weight.dtype), torch.finfo(torch.float32).eps)
    bound = scale.double() / 2 + shift + 8 * amax * eps  # (out, G)
    full = bound.repeat_interleave(group, dim=-1)[:, : w.shape[1]]  # (out, in)
    return full.reshape(weight.shape) if weight.dim() >= 2 else full.reshape(-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``(out, in)`` values 0..15 → ``(out, in / 2)``: column ``2j`` low nibble, ``2j + 1`` high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``(out, in / 2)`` → uint8 ``(out, in)``."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # (out, in/2, 2)
    return out.reshape(packed.shape[0], -1)


# --- fp8 e4m3, per output channel ------------------------------------------------------------


def fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` float8_e4m3fn ``(out, in)`` and fp32 ``scale`` ``(out,)`` with ``max|w| / scale = 448``."""
    w = _rows(weight)
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))  # (out,) fp32
    q = (w / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)  # (out, in)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def fp8_error_bound(weight: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 ulp relative to ``|w|`` (3 mantissa bits: 2⁻⁴), half its smallest subnormal
    (2⁻¹⁰) times the row scale, plus fp32 slack."""
    w = _rows(weight).double()
    _, scale = fp8_per_channel(weight)
    eps = max(_eps(weight.dtype), torch.finfo(torch.float32).eps)
    bound = w.abs() * (2.0**-4 + 4 * eps) + scale.double()[:, None] * 2.0**-10
    return bound.reshape(weight.shape)

"""Reference quantization: symmetric per-channel integer fake-quant, plain casts, SQNR.

A weight is ``(out_features, in_features)``; "per channel" means one scale per output
row (``axis=0``), as torchao's int8 weight-only does.
"""
from __future__ import annotations

import math

import torch


def fake_quant_per_channel(weight: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """Quantize to symmetric ``bits``-bit integers with one scale per channel, then dequantize.

    ``scale = amax(|w|) / qmax`` over each channel with ``qmax = 2**(bits-1) - 1``; the
    integer is ``round(w / scale)`` clamped to ``[-qmax, qmax]`` (the symmetric range). An
    all-zero channel keeps scale 1 and stays zero. Computed in float64, returned in
    ``weight.dtype``.
    """
    qmax = 2 ** (bits - 1) - 1
    w = weight.to(torch.float64)
    dims = [d for d in range(w.dim()) if d != axis % max(w.dim(), 1)]
    amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()  # (out, 1) for a matrix
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return (q * scale).to(weight.dtype)


def int_error_bound(weight: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """Largest ``|fake_quant(w) - w|`` per element: half a step of its channel, plus slack for
    computing in ``weight.dtype`` (``2·amax·eps``). Broadcastable to ``weight.shape``."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.to(torch.float64)
    dims = [d for d in range(w.dim()) if d != axis % max(w.dim(), 1)]
    amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
    eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else 0.0
    bound: torch.Tensor = amax / qmax / 2 + 2 * amax * eps
    return bound


def cast_round_trip(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` cast to ``dtype`` and back (round to nearest even)."""
    return weight.to(dtype).to(weight.dtype)


def cast_error_bound(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest ``|cast_round_trip(w, dtype) - w|`` per element.

    Half a unit in the last place of ``dtype`` relative to ``|w|`` (``eps / 2``), plus half
    the smallest subnormal for values that underflow. Values beyond ``dtype``'s largest
    finite number overflow to infinity, and their bound is infinite.
    """
    info = torch.finfo(dtype)
    w = weight.abs().to(torch.float64)
    smallest_subnormal = info.tiny * info.eps  # 2**(emin - mantissa bits)
    bound = w * (info.eps / 2) + smallest_subnormal / 2
    overflow = w > info.max * (1 + info.eps / 2)
    return torch.where(overflow, torch.full_like(bound, math.inf), bound)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(‖ref‖ / ‖ref − test‖)``.

    ``inf`` when the two are identical (as torchao's ``compute_error``).
    """
    ref = reference.detach().to("cpu", torch.float64)
    noise = (ref - test.detach().to("cpu", torch.float64)).norm().item()
    signal = ref.norm().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)

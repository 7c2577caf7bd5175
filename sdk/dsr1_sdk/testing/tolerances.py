"""Tolerances per dtype and a closeness check with a readable failure message."""
from __future__ import annotations

import torch

#: dtype name → torch dtype, for case tables and capabilities (``"bf16"`` ...).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}

#: (atol, rtol) of an attention output against the float64 reference, computed from the
#: same (already rounded) inputs. fp32 ~1e-5; bf16 keeps 8 mantissa bits, ~2e-2.
ATTENTION_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp64": (1e-10, 1e-10),
    "fp32": (1e-5, 1e-5),
    "fp16": (5e-3, 5e-3),
    "bf16": (2e-2, 2e-2),
}

#: (atol, rtol) of a device matmul of unit-variance operands against float64 on the CPU.
DEVICE_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp64": (1e-10, 1e-10),
    "fp32": (1e-4, 1e-4),
    "fp16": (5e-3, 5e-3),
    "bf16": (2e-2, 2e-2),
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"``."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def close_problem(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> str | None:
    """``None`` when ``|actual - expected| <= atol + rtol·|expected|`` everywhere, else a one-line report."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[0].tolist()
        return f"{what}: non-finite value {a[tuple(bad)].item()} at index {bad}"
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    if bool((err <= allowed).all()):
        return None
    worst = (err - allowed).argmax()
    idx = [int(i) for i in torch.unravel_index(worst, err.shape)]
    return (
        f"{what}: max |diff| {err.max().item():.3g} (atol {atol:g}, rtol {rtol:g}); worst at {idx}: "
        f"got {a[tuple(idx)].item():.6g}, expected {e[tuple(idx)].item():.6g}; "
        f"{int((err > allowed).sum())} of {err.numel()} elements out of tolerance"
    )

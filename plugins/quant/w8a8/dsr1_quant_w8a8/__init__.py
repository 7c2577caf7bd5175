"""``w8a8``: int8 weights (symmetric, per output channel) × int8 activations (dynamic, per token).

Each linear layer keeps int8 ``qweight`` ``(out, in)`` and fp32 ``scales`` ``(out,)`` (the
``int8_per_channel`` checkpoint layout, as ``int8`` writes it). On every call the input rows
``(M, in)`` are quantized with one scale per token (``max|x_row| / 127``), multiplied in
integers with int32 accumulation (``torch._int_mm``), and rescaled by both scales:
``y = (x_q · qweightᵀ) · s_x · s_w``, returned in the compute dtype.

Kernels: ``torch._int_mm`` on CPU (oneDNN, VNNI/AMX int8 where the CPU has them) and on CUDA,
where it needs more than 16 rows, so shorter inputs are zero-padded to 17 rows. Not measured
on a GPU (no device budget). torchao is not used (see the ``int8`` plugin's README).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Dsr1Error, PluginSpec, hookimpl
from dsr1_sdk.quant import (
    Int8PerChannelLinear,
    Int8PerChannelPolicy,
    QuantizedLinear,
    device_type,
    flat,
    int8_per_token,
    linear_layers,
)

__all__ = ["W8A8Dynamic", "W8A8Linear", "dsr1_quant"]

#: rows ``torch._int_mm`` needs on CUDA (it rejects 16 or fewer).
CUDA_MIN_ROWS = 17


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` quantized per token, times int8 ``qweight (out, in)``; ``(..., out)`` in ``x.dtype``."""
    x2 = flat(x)  # (M, in)
    xq, xs = int8_per_token(x2)  # (M, in) int8, (M, 1) fp32
    m = xq.shape[0]
    if x.device.type == "cuda" and m < CUDA_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, CUDA_MIN_ROWS - m))  # (17, in): zero rows, dropped below
    acc = torch._int_mm(xq, qweight.t())[:m]  # (M, out) int32
    y = acc.float() * xs * scales  # (M, out) fp32
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


class W8A8Linear(Int8PerChannelLinear):
    """``y = quant(x) · qweightᵀ · s_x · s_w + b``; ``qweight`` int8 ``(out, in)``, ``scales`` fp32 ``(out,)``."""

    precision = "w8a8"

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__(linear, dtype, scale_dtype=torch.float32)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.qweight, self.scales)


class W8A8Dynamic(Int8PerChannelPolicy):
    """int8 × int8 matmuls with per-token dynamic activation scales; weight scales in fp32."""

    name = "w8a8"
    distribution = "dsr1-quant-w8a8"
    #: of the weight round trip (fp32 scales): measured 40.4-48.2 dB on the kit's cases.
    sqnr_threshold = 38.0

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        return W8A8Linear(linear, self.compute_dtype())

    def scale_dtype(self) -> torch.dtype:
        """fp32: ``torch._int_mm``'s int32 result is rescaled in fp32 (activations are not part of the
        ``quantize_tensor`` round trip)."""
        return torch.float32

    def check_layers(self, model: nn.Module) -> None:
        if device_type(model) != "cuda":
            return
        for name, linear in linear_layers(model, self.options.skip):
            if linear.in_features % 8 or linear.out_features % 8:
                raise Dsr1Error(f"w8a8 on cuda needs in/out features that are multiples of 8 (torch._int_mm); layer "
                                f"{name!r} is {linear.in_features}->{linear.out_features}: add it to options.skip")


@hookimpl
def dsr1_quant() -> PluginSpec:
    return PluginSpec(
        name="w8a8", family="quant", impl=W8A8Dynamic, options=W8A8Dynamic.Options,
        capabilities=frozenset({"per_channel", "dynamic_activations", "save"}),
        description="int8 weights x int8 activations (dynamic per token), int32 accumulate (torch._int_mm)",
    )

"""``w8a8``: int8 weights (symmetric, per output channel) × int8 activations (dynamic, per token).

Each linear layer keeps int8 ``qweight`` ``(out, in)`` and fp32 ``scales`` ``(out,)`` (the
``int8_per_channel`` checkpoint layout, as ``int8`` writes it). On every call the input rows
``(M, in)`` are quantized with one scale per token (``max|x_row| / 127``), multiplied in
integers with int32 accumulation (``torch._int_mm``), and rescaled by both scales:
``y = (x_q · qweightᵀ) · s_x · s_w``, returned in the compute dtype.

Kernels:

* CPU, up to :data:`dsr1_sdk.kernels.cpu.MAX_ROWS` rows (decode): the SDK's CPU GEMV, format ``w8a8``
  (:mod:`dsr1_sdk.kernels.cpu`), which quantizes the rows and multiplies in int8 with VNNI dot products
  (AVX2's byte multiplies without VNNI), reading each weight once; its result equals the torch formulation
  below bit for bit, and it is faster than it at 1 and 8 rows (``bench/results/cpu-gemv/``). Where it
  cannot be built (no C++ compiler; one warning says so), for more rows and for an input width past
  :data:`dsr1_sdk.kernels.cpu.W8A8_MAX_K`: the torch formulation.
* The torch formulation: ``torch._int_mm`` on CPU (oneDNN, VNNI/AMX int8 where the CPU has them) and on
  CUDA, where it needs more than 16 rows, so shorter inputs are zero-padded to 17 rows.

torchao is not used (see the ``int8`` plugin's README).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Dsr1Error, PluginSpec, hookimpl
from dsr1_sdk.kernels import cpu as cpu_kernels
from dsr1_sdk.quant import (
    Int8PerChannelLinear,
    Int8PerChannelPolicy,
    QuantizedLinear,
    device_type,
    flat,
    int8_per_token,
    linear_layers,
)

__all__ = ["W8A8Dynamic", "W8A8Linear", "dsr1_quant", "w8a8_linear", "w8a8_torch"]

#: rows ``torch._int_mm`` needs on CUDA (it rejects 16 or fewer).
CUDA_MIN_ROWS = 17


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` quantized per token, times int8 ``qweight (out, in)``; ``(..., out)`` in ``x.dtype``."""
    x2 = flat(x)  # (M, in)
    m = x2.shape[0]
    if x.device.type == "cpu" and m <= cpu_kernels.MAX_ROWS and qweight.shape[1] <= cpu_kernels.W8A8_MAX_K \
            and cpu_kernels.usable("w8a8", "torch._int_mm"):
        y = cpu_kernels.gemv(x2, "w8a8", qweight, scales)  # (M, out) in x.dtype
    else:
        y = w8a8_torch(x2, qweight, scales)  # (M, out) in x.dtype
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def w8a8_torch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The torch formulation of :func:`w8a8_linear` for ``x2 (M, in)``: ``(M, out)`` in ``x2.dtype`` (the SDK's
    CPU kernel equals it bit for bit; ``dsr1.benchmarks.cpu_gemv`` times it as the path the kernel replaced)."""
    m = x2.shape[0]
    xq, xs = int8_per_token(x2)  # (M, in) int8, (M, 1) fp32
    if x2.device.type == "cuda" and m < CUDA_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, CUDA_MIN_ROWS - m))  # (17, in): zero rows, dropped below
    acc = torch._int_mm(xq, qweight.t())[:m]  # (M, out) int32
    return (acc.float() * xs * scales).to(x2.dtype)  # (M, out)


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

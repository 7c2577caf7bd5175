"""``int8``: weight-only int8, symmetric, one scale per output channel.

Each linear weight ``(out, in)`` becomes int8 ``qweight`` in ``[-127, 127]`` and ``scales``
``(out,)`` in the compute dtype, with ``scale ≥ max|w_row| / 127`` (rounded up to the compute
dtype, so nothing clips): ``w ≈ qweight · scale``, error at most half a step per row.
Activations stay in the compute dtype (bf16 by default).

Kernels, one per device type:

* CPU, up to :data:`dsr1_sdk.kernels.cpu.MAX_ROWS` rows (decode): the SDK's CPU GEMV
  (:mod:`dsr1_sdk.kernels.cpu`, format ``int8``), which reads each int8 weight once, converts it to
  fp32 in registers and applies the scales per channel (activations and scales converted to fp32
  per call, the result back to the compute dtype). Over tiny-125m's layers it is faster than
  ``aten._weight_int8pack_mm`` at 1 and 8 rows on the AVX-512 CPU measured, on its AVX-512 and its
  AVX2 path (``bench/results/cpu-gemv/``). Where it cannot be built (no C++ compiler; one warning
  says so) and for 9 to :data:`INT8PACK_MAX_ROWS` rows:
  ``torch.ops.aten._weight_int8pack_mm`` (bf16/fp16/fp32 activations × int8 weight, scales applied
  in the kernel), which with fp32 activations is slower than an fp32 matmul (see README).
* CUDA, up to :data:`dsr1_sdk.kernels.MAX_ROWS` fp16/bf16 rows (decode), option
  ``cuda_kernel: triton`` (the default): the SDK's weight-only Triton kernels
  (:mod:`dsr1_sdk.kernels.weight_only`, shared with int4 and fp8) read the int8 weight and convert it
  in registers. ``cuda_kernel: int8pack`` runs
  ``aten._weight_int8pack_mm`` instead and ``dequant`` the formulation below; both measured
  slower than bf16 on the H200 (README).
* Everything else (CPU and CUDA prefill, fp32 activations on CUDA, other devices):
  ``F.linear(x, qweight.to(x.dtype)) * scales``, the gpt-fast formulation: compute-bound calls
  lose nothing by dequantizing first.

torchao is not used: with torch 2.13 CPU its import reports C extensions that fail to load,
and its int8 weight-only linear runs eager as a full dequantize + matmul, 2x slower than bf16
on the CPU measured, while ``_weight_int8pack_mm`` is faster (README has the figures).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Dsr1Error, PluginSpec, hookimpl
from dsr1_sdk.kernels import MAX_ROWS as TRITON_MAX_ROWS
from dsr1_sdk.kernels import cpu as cpu_kernels
from dsr1_sdk.kernels import triton_problem
from dsr1_sdk.quant import Int8PerChannelLinear, Int8PerChannelPolicy, QuantizedLinear, QuantOptions, flat

__all__ = ["CudaKernel", "Int8WeightOnly", "Int8WeightOnlyLinear", "cuda_kernel_problems", "dsr1_quant",
           "int8_weight_only_linear"]


#: rows up to which the CPU kernel ``_weight_int8pack_mm`` is used. Its cost grows linearly with the
#: rows (a matrix-vector loop): at 16 rows it ties with dequantize + bf16 GEMM, at 64 it is 2.6x
#: slower, at 512 8x (768x2048 weights, 1 thread; README has the command).
INT8PACK_MAX_ROWS = 12
#: activation dtypes the CUDA Triton kernels take (up to ``TRITON_MAX_ROWS`` rows).
TRITON_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _triton_mm() -> Callable[..., torch.Tensor]:
    """The SDK's Triton op, imported on the first CUDA call (the plugin itself loads without triton)."""
    from dsr1_sdk.kernels.weight_only import weight_only_mm

    return weight_only_mm


def int8_weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, cuda_kernel: str = "dequant"
) -> torch.Tensor:
    """``x (..., in) @ (qweight · scales)ᵀ`` → ``(..., out)`` in ``x.dtype`` (scales in ``x.dtype``).

    Decode-sized calls read the int8 weight directly: the SDK's CPU GEMV on the CPU (the aten int8
    kernel where that cannot run, and from 9 to 12 rows), the ``cuda_kernel`` on CUDA (``triton`` or
    ``int8pack``). Otherwise the weight is converted to ``x.dtype`` and multiplied by a GEMM, then
    scaled per column.
    """
    out = qweight.shape[0]
    x2 = flat(x)  # (M, in)
    rows, on = x2.shape[0], x.device.type
    if on == "cpu" and rows <= cpu_kernels.MAX_ROWS and cpu_kernels.usable("int8", "aten._weight_int8pack_mm"):
        y = cpu_kernels.gemv(x2, "int8", qweight, scales)  # (M, out) in x.dtype
    elif on == "cuda" and cuda_kernel == "triton" and rows <= TRITON_MAX_ROWS and x.dtype in TRITON_DTYPES:
        y = _triton_mm()(x2, "int8", qweight, scales, None, 0)  # (M, out)
    elif rows <= INT8PACK_MAX_ROWS and (on == "cpu" or (on == "cuda" and cuda_kernel == "int8pack")):
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales)  # (M, out)
    else:
        y = F.linear(x2, qweight.to(x.dtype)) * scales  # (M, out)
    return y.reshape(*x.shape[:-1], out)


class Int8WeightOnlyLinear(Int8PerChannelLinear):
    """``y = x (qweight · scales)ᵀ + b``; ``qweight`` int8 ``(out, in)``, ``scales`` ``(out,)`` in the compute dtype."""

    precision = "int8"

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, cuda_kernel: str = "triton") -> None:
        super().__init__(linear, dtype, scale_dtype=dtype)
        self.cuda_kernel = cuda_kernel

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_linear(x, self.qweight, self.scales, self.cuda_kernel)


#: the CUDA kernels of decode-sized calls (see :class:`Int8Options`).
CudaKernel = Literal["triton", "dequant", "int8pack"]
CUDA_KERNELS: tuple[str, ...] = get_args(CudaKernel)


def cuda_kernel_problems(device: str, cuda_kernel: str) -> list[str]:
    """Why ``cuda_kernel`` cannot run on ``device`` (empty when it can): ``triton`` needs the triton package."""
    problem = triton_problem("int8 cuda_kernel 'triton'") if device == "cuda" and cuda_kernel == "triton" else None
    return [f"{problem}, or set options.cuda_kernel: dequant"] if problem else []


class Int8Options(QuantOptions):
    #: CUDA kernel for decode-sized calls: ``triton`` (the default; up to 64 fp16/bf16 rows) reads the
    #: int8 weight and dequantizes in registers; ``dequant`` converts the weight to the compute dtype and
    #: runs cuBLAS; ``int8pack`` runs ``aten._weight_int8pack_mm`` (up to 12 rows). README has the figures.
    cuda_kernel: CudaKernel = "triton"


class Int8WeightOnly(Int8PerChannelPolicy):
    """Weight-only int8 of every linear layer (a tied output head stays in floating point); scales in the
    compute dtype."""

    name = "int8"
    distribution = "dsr1-quant-int8"
    #: measured 40.4-48.2 dB on the kit's cases (bf16 scales); README has the command.
    sqnr_threshold = 38.0

    Options = Int8Options
    options: Int8Options

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        return cuda_kernel_problems(device, self.options.cuda_kernel)

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        return Int8WeightOnlyLinear(linear, self.compute_dtype(), self.options.cuda_kernel)

    def kernel_choices(self, device: Any) -> Sequence[str]:
        """Nothing for graph ``adaptive`` to choose: up to 64 rows the Triton kernels beat both others at every
        Qwen2-7B shape measured (README), above 64 every kernel setting runs dequantize + cuBLAS, and each
        kernel offered would double the compile-and-capture trials. :meth:`use_kernel_` still switches."""
        return []

    def use_kernel_(self, model: nn.Module, kernel: str) -> None:
        """Every int8 layer of ``model`` runs ``kernel`` on CUDA from now on (one weight layout: an attribute)."""
        if kernel not in CUDA_KERNELS:
            raise Dsr1Error(f"int8 has no cuda_kernel {kernel!r}; use one of {', '.join(CUDA_KERNELS)}")
        for module in model.modules():
            if isinstance(module, Int8WeightOnlyLinear):
                module.cuda_kernel = kernel


@hookimpl
def dsr1_quant() -> PluginSpec:
    return PluginSpec(
        name="int8", family="quant", impl=Int8WeightOnly, options=Int8WeightOnly.Options,
        capabilities=frozenset({"weight_only", "per_channel", "save"}),
        description="weight-only int8, symmetric per output channel (the SDK's GEMV on CPU, Triton on CUDA)",
    )

"""``fp32``, ``fp16``, ``bf16``: precision policies that cast the model to one float dtype.

``quantize_`` casts every floating parameter and buffer in place (integer buffers, such
as position ids, are left alone) and the model then computes in that dtype
(``compute_dtype``). The round trip the conformance kit checks is the cast there and
back, whose error is at most half a unit in the last place of the target dtype
(``error_bound``).

Declared SQNR thresholds (dB, of the round trip against fp32 on the kit's cases):
fp32 150 (the round trip is exact), fp16 60 (11 significant bits: 73-75 dB measured on
the kit's cases), bf16 40 (8 significant bits: 55-57 dB measured).

``bf16`` with ``options.cuda_kernel: triton`` sends one-row calls of the linear layers on CUDA
(decode at batch 1) through the SDK's Triton GEMV (:mod:`dsr1_sdk.kernels.weight_only`, format
``bf16``, split over K where that tuned faster) instead of cuBLAS, whose one-row kernels read the
smaller layers well below the memory bandwidth. Calls of two rows or more stay on cuBLAS.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Field, PluginOptions, PluginSpec, QuantPolicy, hookimpl
from dsr1_sdk.kernels import triton_problem
from dsr1_sdk.quant import refuse_unless_valid, replace_linears_
from dsr1_sdk.reference.quant import cast_error_bound

__all__ = ["Bf16Cast", "Bf16Options", "FloatCast", "Fp16Cast", "Fp32Cast", "GemvLinear", "dsr1_quant"]


class FloatCast(QuantPolicy):
    """Cast the model's floating tensors to :attr:`dtype` (set by each subclass)."""

    dtype: ClassVar[torch.dtype] = torch.float32

    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(dtype=self.dtype)  # floating params and buffers only; in place

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype).to(weight.dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half an ulp of :attr:`dtype` relative to ``|w|``, plus half its smallest subnormal."""
        return cast_error_bound(weight, self.dtype)

    def compute_dtype(self) -> torch.dtype:
        return self.dtype


class Fp32Cast(FloatCast):
    dtype = torch.float32
    sqnr_threshold = 150.0


class Fp16Cast(FloatCast):
    dtype = torch.float16
    sqnr_threshold = 60.0


class Bf16Options(PluginOptions):
    #: ``cublas``: torch's matmul for every call; ``triton``: one-row calls on CUDA through the SDK's Triton GEMV.
    cuda_kernel: Literal["cublas", "triton"] = Field("cublas")


@functools.cache
def _triton_mm() -> Callable[..., torch.Tensor]:
    """The SDK's Triton op, imported on the first CUDA call (the plugin itself loads without triton)."""
    from dsr1_sdk.kernels.weight_only import weight_only_mm

    return weight_only_mm


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose one-row bf16 CUDA calls run the Triton GEMV."""

    @classmethod
    def sharing(cls, linear: nn.Linear) -> GemvLinear:
        """A GemvLinear holding ``linear``'s own parameters (no copy; a tied weight stays tied)."""
        with torch.device("meta"):
            gemv = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        gemv.weight = linear.weight
        gemv.bias = linear.bias
        return gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:  # one row: decode at batch 1
            y = _triton_mm()(x.reshape(1, -1), "bf16", self.weight, None, None, 0)  # (1, out)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class Bf16Cast(FloatCast):
    dtype = torch.bfloat16
    sqnr_threshold = 40.0
    Options = Bf16Options
    options: Bf16Options

    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().quantize_(model)
        if self.options.cuda_kernel == "triton":
            refuse_unless_valid(self, model)
            replace_linears_(model, lambda name, linear: GemvLinear.sharing(linear))
        return model

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        if self.options.cuda_kernel != "triton":
            return []
        if device != "cuda":
            return [f"bf16 cuda_kernel 'triton' runs on CUDA devices, not {device!r}; set options.cuda_kernel: cublas"]
        problem = triton_problem("bf16 cuda_kernel 'triton'")
        return [f"{problem}, or set options.cuda_kernel: cublas"] if problem else []


@hookimpl
def dsr1_quant() -> list[PluginSpec]:
    return [
        PluginSpec(name="fp32", family="quant", impl=Fp32Cast, capabilities=frozenset({"cast"}),
                   description="cast the model to float32 and compute in float32"),
        PluginSpec(name="fp16", family="quant", impl=Fp16Cast, capabilities=frozenset({"cast"}),
                   description="cast the model to float16 and compute in float16 (slow on CPU)"),
        PluginSpec(name="bf16", family="quant", impl=Bf16Cast, options=Bf16Options, capabilities=frozenset({"cast"}),
                   description="cast the model to bfloat16 and compute in bfloat16"),
    ]

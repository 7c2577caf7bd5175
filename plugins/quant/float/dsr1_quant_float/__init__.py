"""``fp32``, ``fp16``, ``bf16``: precision policies that cast the model to one float dtype.

``quantize_`` casts every floating parameter and buffer in place (integer buffers, such
as position ids, are left alone) and the model then computes in that dtype
(``compute_dtype``). The round trip the conformance kit checks is the cast there and
back, whose error is at most half a unit in the last place of the target dtype
(``error_bound``).

Declared SQNR thresholds (dB, of the round trip against fp32 on the kit's cases):
fp32 150 (the round trip is exact), fp16 60 (11 significant bits: 73-75 dB measured on
the kit's cases), bf16 40 (8 significant bits: 55-57 dB measured).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from dsr1_sdk import PluginSpec, QuantPolicy, hookimpl
from dsr1_sdk.reference.quant import cast_error_bound

__all__ = ["Bf16Cast", "FloatCast", "Fp16Cast", "Fp32Cast", "dsr1_quant"]


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


class Bf16Cast(FloatCast):
    dtype = torch.bfloat16
    sqnr_threshold = 40.0


@hookimpl
def dsr1_quant() -> list[PluginSpec]:
    return [
        PluginSpec(name="fp32", family="quant", impl=Fp32Cast, capabilities=frozenset({"cast"}),
                   description="cast the model to float32 and compute in float32"),
        PluginSpec(name="fp16", family="quant", impl=Fp16Cast, capabilities=frozenset({"cast"}),
                   description="cast the model to float16 and compute in float16 (slow on CPU)"),
        PluginSpec(name="bf16", family="quant", impl=Bf16Cast, capabilities=frozenset({"cast"}),
                   description="cast the model to bfloat16 and compute in bfloat16"),
    ]

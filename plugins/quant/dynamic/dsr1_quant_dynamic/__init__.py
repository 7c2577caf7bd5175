"""``dynamic``: the seed's dynamic mixed precision, with a fidelity guard.

The model starts in high precision (bf16 by default). During the first ``warmup_steps``
forwards every linear layer measures the SQNR its int8 output would have on the live
activations; then the layers at or above ``sqnr_threshold_db`` switch to int8 (weight-only,
per channel, the ``int8`` plugin's kernel) and the sensitive ones stay in high precision.
A guard compares the top-1 tokens against an all-high-precision run every ``guard_every``
steps and switches layers back when agreement over the last ``guard_window_tokens`` compared
tokens falls below ``guard_agreement``. Every switch goes through the monitor (``quant.switch``,
``quant.guard``); :meth:`DynamicPrecision.precision_map` is the per-layer map that
``dsr1 generate --json`` prints. Details: :mod:`dsr1_quant_dynamic.controller`.

Nothing is decided ahead of time, so ``dsr1 quantize`` refuses this policy; the model saves
as its plain high-precision weights.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dsr1_quant_dynamic.controller import PrecisionController
from dsr1_quant_dynamic.layer import DynamicLinear
from dsr1_quant_int8 import CudaKernel, cuda_kernel_problems
from dsr1_sdk import BaseModel, ConfigDict, Field, PluginSpec, QuantPolicy, hookimpl
from dsr1_sdk.quant import (
    DTYPES,
    cast_floats_,
    int8_dequantize,
    int8_error_bound,
    int8_per_channel,
    precision_map,
    refuse_unless_valid,
    replace_linears_,
)

__all__ = ["DynamicLinear", "DynamicOptions", "DynamicPrecision", "PrecisionController", "dsr1_quant"]


class DynamicOptions(BaseModel):
    """Options of ``dynamic`` (unknown keys and out-of-range values are refused with one line)."""

    model_config = ConfigDict(extra="forbid")

    #: the precision of warm-up and of the layers kept out of int8.
    high_precision: Literal["bf16", "fp16"] = "bf16"
    #: forwards run in high precision while the per-layer SQNR is measured.
    warmup_steps: int = Field(4, ge=1, le=1_000_000)
    #: a layer switches to int8 when its live SQNR (dB) is at least this (0-100).
    sqnr_threshold_db: float = Field(30.0, ge=0.0, le=100.0)
    #: every n-th step after warm-up is sampled by the guard (a sampled step runs twice: ~1/n overhead).
    guard_every: int = Field(8, ge=1, le=1_000_000)
    #: compared tokens the top-1 agreement is computed over (the newest ones).
    guard_window_tokens: int = Field(64, ge=1, le=10_000_000)
    #: the guard trips when top-1 agreement over the window is below this (0-1].
    guard_agreement: float = Field(0.9, gt=0.0, le=1.0)
    #: share of the int8 layers (least accurate first) switched back when the guard trips (0-1].
    fallback_fraction: float = Field(1.0, gt=0.0, le=1.0)
    #: ``fnmatch`` patterns of linear layers that always stay in high precision.
    skip: list[str] = Field(default_factory=list)
    #: CUDA kernel of the int8 layers at decode sizes, as the ``int8`` plugin's option (``triton`` reads int8).
    cuda_kernel: CudaKernel = "triton"


class DynamicPrecision(QuantPolicy):
    """High precision at start-up, int8 for the layers that measure well, a guard that switches back."""

    Options: ClassVar[type[BaseModel]] = DynamicOptions
    options: DynamicOptions
    #: of the int8 path's round trip (bf16 scales), as the ``int8`` plugin: measured 40.4-48.2 dB.
    sqnr_threshold = 38.0

    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.options.high_precision]

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        return cuda_kernel_problems(device, self.options.cuda_kernel)

    def quantize_(self, model: nn.Module) -> nn.Module:
        refuse_unless_valid(self, model)
        dtype = self.compute_dtype()
        with torch.no_grad():
            names = replace_linears_(model, lambda name, linear: DynamicLinear(linear, dtype, self.options.cuda_kernel),
                                     self.options.skip)
            cast_floats_(model, dtype)
        layers = {n: model.get_submodule(n) for n in names}
        monitor = getattr(getattr(model, "pipeline", None), "monitor", None)
        controller = PrecisionController(layers, self.options, monitor)  # type: ignore[arg-type]
        target = "forward_step" if callable(getattr(model, "forward_step", None)) else "forward"
        setattr(model, target, controller.wrap(getattr(model, target)))
        model.precision_controller = controller
        return model

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        """The int8 path's round trip (what a switched layer computes with)."""
        q, scales = int8_per_channel(weight, self.compute_dtype())
        return int8_dequantize(q, scales).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        return int8_error_bound(weight, self.compute_dtype())

    def precision_map(self, model: nn.Module) -> dict[str, str]:
        """Every linear layer and the precision it runs in now."""
        return precision_map(model)

    def report(self, model: nn.Module) -> dict[str, Any] | None:
        """The controller's state (phase, steps, measured SQNR per layer), or ``None`` before ``quantize_``."""
        controller = getattr(model, "precision_controller", None)
        return controller.report() if controller is not None else None


@hookimpl
def dsr1_quant() -> PluginSpec:
    return PluginSpec(
        name="dynamic", family="quant", impl=DynamicPrecision, options=DynamicOptions,
        capabilities=frozenset({"dynamic", "weight_only", "per_channel"}),
        description="bf16 warm-up, per-layer int8 by live SQNR, top-1 agreement guard that switches back",
    )

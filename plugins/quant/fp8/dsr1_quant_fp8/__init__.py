"""``fp8``: float8 e4m3 weights with one fp32 scale per output channel, e4m3 activations.

Weights: ``scale = max|w_row| / 448`` (e4m3's largest finite value), ``qweight = w / scale``
cast to ``float8_e4m3fn`` (3 mantissa bits: relative error ≤ 2⁻⁴). Activations: one dynamic
scale per call (``max|x| / 448``, tensor-wise). The matmul is ``torch._scaled_mm`` (fp8 tensor
cores) with the activation scale, then the per-channel weight scale on its output:
``y = (x_q · qweightᵀ) · s_x · s_w``. Tensor-wise ``_scaled_mm`` runs on compute capability
8.9 (Ada) and 9.0 (Hopper); ``_scaled_mm`` wants K and N in multiples of 16 (and M is padded
to 16).

GPU only: ``validate`` refuses every other device, and a GPU older than sm89, with the
reason. Not measured (no device budget); the CPU tests check the quantization math, the
reference path and the checkpoint layout. The weight is held as a uint8 view of its bytes,
so ``model.to(dtype)`` never upcasts it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Dsr1Error, PluginSpec, hookimpl
from dsr1_sdk.quant import (
    FP8_E4M3_MAX,
    QuantizedLinear,
    StaticQuantPolicy,
    flat,
    fp8_dequantize,
    fp8_error_bound,
    fp8_per_channel,
    linear_layers,
)

__all__ = ["Fp8E4M3", "Fp8Linear", "dsr1_quant", "fp8_linear"]

#: compute capability ``torch._scaled_mm`` needs for e4m3.
MIN_CAPABILITY = (8, 9)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` × e4m3 ``qweight (out, in)`` on CUDA → ``(..., out)`` in ``x.dtype``."""
    x2 = flat(x)  # (M, in)
    m = x2.shape[0]
    x_scale = (x2.abs().amax().float() / FP8_E4M3_MAX).clamp_min(1e-12)  # () fp32, tensor-wise
    xq = (x2.float() / x_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    if m % 16:
        xq = F.pad(xq.view(torch.uint8), (0, 0, 0, 16 - m % 16)).view(torch.float8_e4m3fn)  # (M16, in)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)[:m]  # (M, out)
    return (y * scales).to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


class Fp8Linear(QuantizedLinear):
    """``y = (x_q · qweightᵀ) · s_x · s_w + b``; ``qweight`` e4m3 ``(out, in)``, ``scales`` fp32 ``(out,)``."""

    FORMAT: ClassVar[str] = "fp8_e4m3_per_channel"
    precision = "fp8"

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        q, scales = fp8_per_channel(linear.weight)
        device = linear.weight.device
        self.register_buffer("qweight_bytes", q.view(torch.uint8).to(device), persistent=False)  # (out, in)
        self.register_buffer("scales", scales.to(device))  # (out,) fp32

    @property
    def qweight(self) -> torch.Tensor:
        """The e4m3 weight ``(out, in)`` (a view of ``qweight_bytes``)."""
        return self.qweight_bytes.view(torch.float8_e4m3fn)

    def dequantize(self) -> torch.Tensor:
        return fp8_dequantize(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.qweight, self.scales)
        return y + self.bias if self.bias is not None else y

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # scales, bias
        destination[prefix + "qweight"] = self.qweight

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        key = prefix + "qweight"
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            missing_keys.append(key)
            return
        q = state_dict[key]
        if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"fp8 layer {prefix!r}: stored qweight {q.dtype} {tuple(q.shape)} is not float8_e4m3fn "
                              f"({self.out_features}, {self.in_features})")
            return
        self.qweight_bytes.copy_(q.view(torch.uint8))


class Fp8E4M3(StaticQuantPolicy):
    """float8 e4m3 weights and activations on NVIDIA GPUs of compute capability 8.9 or newer."""

    name = "fp8"
    distribution = "dsr1-quant-fp8"
    FORMAT = "fp8_e4m3_per_channel"
    #: measured 31.5-32.9 dB on the kit's cases (e4m3 keeps 3 mantissa bits).
    sqnr_threshold = 30.0

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        if device != "cuda":
            return [f"fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper) for torch._scaled_mm; "
                    f"{device} has no fp8 matmul: use int8"]
        if not torch.cuda.is_available():
            return ["fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9+; no CUDA device is visible: use int8"]
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            return [f"fp8 e4m3 needs compute capability 8.9+ (Ada, Hopper); {torch.cuda.get_device_name()} is "
                    f"sm{cap[0]}{cap[1]}, without fp8 tensor cores: use int8"]
        return []

    def check_layers(self, model: nn.Module) -> None:
        for name, linear in linear_layers(model, self.options.skip):
            if linear.in_features % 16 or linear.out_features % 16:
                raise Dsr1Error(f"fp8 needs in/out features in multiples of 16 (torch._scaled_mm); layer {name!r} "
                                f"is {linear.in_features}->{linear.out_features}: keep it in floating point with "
                                f"options.skip")

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        return Fp8Linear(linear, self.compute_dtype())

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        q, scales = fp8_per_channel(weight)
        return fp8_dequantize(q, scales).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half an e4m3 ulp relative to ``|w|`` plus half its smallest subnormal times the row scale."""
        return fp8_error_bound(weight)


@hookimpl
def dsr1_quant() -> PluginSpec:
    return PluginSpec(
        name="fp8", family="quant", impl=Fp8E4M3, options=Fp8E4M3.Options,
        capabilities=frozenset({"per_channel", "dynamic_activations", "save", "device:cuda"}),
        description="float8 e4m3 weights (per channel) and activations (dynamic), torch._scaled_mm on sm89+",
    )

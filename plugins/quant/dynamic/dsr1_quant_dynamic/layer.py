"""A linear layer that runs in high precision or int8, and measures what int8 would cost.

``mode`` is one of

* ``"observe"`` (warm-up): the output is the high-precision one; the int8 output is
  computed too, and the energy of both and of their difference accumulate on the device
  (no host sync per call): :meth:`DynamicLinear.sqnr_db` is the layer's SQNR on live
  activations.
* ``"hp"``: high precision (bf16/fp16) only.
* ``"int8"``: :func:`dsr1_quant_int8.int8_weight_only_linear` only (on CUDA with the int8
  plugin's kernels, option ``cuda_kernel``).

The layer keeps both weights (the high-precision one is what it saves and loads; the
int8 copy is recomputed from it), so this policy trades memory for speed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_quant_int8 import int8_weight_only_linear
from dsr1_sdk.quant import QuantizedLinear, int8_dequantize, int8_per_channel

Mode = Literal["observe", "hp", "int8"]
HP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class DynamicLinear(QuantizedLinear):
    """``nn.Linear`` with a switchable int8 path; ``weight`` ``(out, in)`` in the high-precision dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, cuda_kernel: str = "triton") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        self.cuda_kernel = cuda_kernel  # the int8 path's CUDA kernel (dsr1_quant_int8.Int8Options.cuda_kernel)
        self.register_buffer("weight", linear.weight.detach().to(dtype))  # (out, in), the saved tensor
        self.mode: Mode = "observe"
        #: live SQNR (dB) measured during warm-up (``None`` until decided).
        self.measured_db: float | None = None
        self._requantize(linear.weight)
        self.reset_stats()

    def _requantize(self, weight: torch.Tensor) -> None:
        q, scales = int8_per_channel(weight, self.compute_dtype)
        self.register_buffer("qweight", q.to(weight.device), persistent=False)  # (out, in) int8
        self.register_buffer("scales", scales.to(weight.device), persistent=False)  # (out,)

    def reset_stats(self) -> None:
        device = self.weight.device
        self.signal = torch.zeros((), dtype=torch.float64, device=device)
        self.noise = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def precision(self) -> str:  # type: ignore[override]  # a property here, a class attribute in the base
        return "int8" if self.mode == "int8" else HP_NAMES.get(self.compute_dtype, "hp")

    def sqnr_db(self) -> float:
        """SQNR of the int8 output against the high-precision one over everything observed (``inf``: no error)."""
        signal, noise = float(self.signal), float(self.noise)
        if noise == 0.0:
            return math.inf if signal > 0 else -math.inf
        return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf

    def dequantize(self) -> torch.Tensor:
        return int8_dequantize(self.qweight, self.scales) if self.mode == "int8" else self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            y = int8_weight_only_linear(x, self.qweight, self.scales, self.cuda_kernel)
        else:
            y = F.linear(x, self.weight)  # (..., out)
            if self.mode == "observe":
                diff = y.float() - int8_weight_only_linear(x, self.qweight, self.scales, self.cuda_kernel).float()
                self.signal += y.float().pow(2).sum().double()
                self.noise += diff.pow(2).sum().double()
        return y + self.bias if self.bias is not None else y

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._requantize(self.weight)  # the int8 copy always follows the loaded weight

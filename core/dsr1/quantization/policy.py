"""The shared shape of a static quant policy: options, ``quantize_``, the checkpoint config.

A plugin subclasses :class:`StaticQuantPolicy`, sets ``name``/``distribution``/``FORMAT`` and
implements ``make_layer(name, linear)``; ``quantize_`` then checks the device with the
plugin's own ``validate``, swaps every quantizable linear layer one at a time (each computed
from the layer's full-precision weight), casts the remaining floating tensors (embeddings,
norms) to the compute dtype, and records what it did on the model
(``model.quantization_config``: what ``save_pretrained`` writes into ``config.json``).
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.interfaces import QuantPolicy
from dsr1.quantization.modules import (
    DTYPES,
    QuantizedLinear,
    cast_floats_,
    precision_map,
    refuse_unless_valid,
    replace_linears_,
    unquantized_experts,
)
from dsr1.quantization.schemes import int8_dequantize, int8_error_bound, int8_per_channel

#: ``quant_method`` of every dsr1-written checkpoint; transformers knows no such method and refuses it.
QUANT_METHOD = "dsr1"
#: version of the checkpoint layout this code writes and reads.
FORMAT_VERSION = 1


class QuantOptions(BaseModel):
    """Options every static policy takes (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    #: dtype of activations, scales and the layers left in floating point.
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    #: ``fnmatch`` patterns of linear layers to keep in floating point (``["lm_head", "*.down_proj"]``).
    skip: list[str] = Field(default_factory=list)


class StaticQuantPolicy(QuantPolicy):
    """Quantize every linear layer once, at load time."""

    Options: ClassVar[type[BaseModel]] = QuantOptions
    #: entry-point name and distribution (written into ``quantization_config``).
    name: ClassVar[str] = ""
    distribution: ClassVar[str] = ""
    #: canonical checkpoint layout of the layers it makes (``checkpoint.FORMATS``).
    FORMAT: ClassVar[str] = ""
    options: Any

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        """The quantized replacement of ``linear`` (called with the layer's name for error messages)."""
        raise NotImplementedError

    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.options.compute_dtype]

    def quantize_experts_(self, name: str, experts: nn.Module) -> None:
        """Quantize one stack of MoE experts (``stacked_experts`` modules: :class:`dsr1.models.moe.Experts`) in
        place, or leave it in floating point (the default; ``quantize_`` then says so)."""

    def check_layers(self, model: nn.Module) -> None:
        """Raise a one-line error naming the first layer this policy cannot quantize (before touching any)."""

    def quantize_(self, model: nn.Module) -> nn.Module:
        refuse_unless_valid(self, model)
        self.check_layers(model)
        with torch.no_grad():
            names = replace_linears_(model, self.make_layer, self.options.skip)
            for name, experts in unquantized_experts(model, self.options.skip):
                self.quantize_experts_(name, experts)
            cast_floats_(model, self.compute_dtype())
        if not names:
            raise Dsr1Error(f"quant {self.name!r} found no linear layer to quantize (skip={self.options.skip})")
        left = unquantized_experts(model, self.options.skip)
        if left:  # said, not silent: the precision map lists them too
            warnings.warn(f"quant {self.name!r}: the routed experts of {len(left)} MoE layer(s) stay in "
                          f"{self.options.compute_dtype} ({self.name} does not quantize stacked experts; attention, "
                          "shared experts and dense layers are quantized)", stacklevel=2)
        model.quantization_config = self.quantization_config()
        return model

    def quantization_config(self) -> dict[str, Any]:
        """What ``config.json`` says about a checkpoint this policy wrote."""
        return {
            "quant_method": QUANT_METHOD,
            "policy": self.name,
            "distribution": self.distribution,
            "format": self.FORMAT,
            "format_version": FORMAT_VERSION,
            "options": self.options.model_dump(mode="json"),
            "note": f"quantized weights (qweight/scales), not plain ones: load with dsr1 and `pip install "
                    f"{self.distribution}`",
        }

    def precision_map(self, model: nn.Module) -> dict[str, str]:
        """Every linear layer and its precision (``dsr1 generate --json`` shows it)."""
        return precision_map(model)


class Int8PerChannelPolicy(StaticQuantPolicy):
    """A static policy whose weights are int8, symmetric, one scale per output channel, the scales in
    :meth:`scale_dtype` (the layers it makes subclass :class:`~dsr1.quantization.modules.Int8PerChannelLinear`)."""

    FORMAT = "int8_per_channel"

    def scale_dtype(self) -> torch.dtype:
        """The dtype the kernel reads the scales in (default: the compute dtype)."""
        return self.compute_dtype()

    def quantize_experts_(self, name: str, experts: nn.Module) -> None:
        """Experts take int8 weights per output row too (weight-only: activations stay in the compute dtype)."""
        experts.quantize_(lambda w: int8_per_channel(w, self.scale_dtype()))

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        q, scales = int8_per_channel(weight, self.scale_dtype())
        return int8_dequantize(q, scales).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half a quantization step of each row (``scale / 2``) plus float rounding slack."""
        return int8_error_bound(weight, self.scale_dtype())

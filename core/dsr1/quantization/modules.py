"""Swapping ``nn.Linear`` layers for quantized ones, and what every quantized layer shares.

A quantized layer subclasses :class:`QuantizedLinear`. Its ``state_dict`` holds the
*canonical* tensors written to a quantized checkpoint (``qweight``, ``scales``, ``zeros``,
``bias``), whatever layout its kernel runs on: the checkpoint stays portable across devices,
and every tensor splits along dim 0 like a weight (so fused ``qkv_proj`` splits back into
``q_proj``/``k_proj``/``v_proj`` on save). ``FORMAT`` names the canonical layout
(:data:`dsr1.quantization.checkpoint.FORMATS` knows how to dequantize each one).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.quantization.schemes import int8_dequantize, int8_per_channel

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class QuantizedLinear(nn.Module):
    """Base of the quantized replacements of ``nn.Linear`` (``y = x Wᵀ + b`` on ``(..., in)``)."""

    #: canonical checkpoint layout of this layer's tensors (see ``checkpoint.FORMATS``).
    FORMAT: ClassVar[str] = ""
    #: what :func:`precision_map` reports for this layer.
    precision: str = "int8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:
        """The ``(out, in)`` fp32 weight this layer computes with (reference path)."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow path: ``x`` times the dequantized weight, in fp32, returned in ``x.dtype``."""
        w = self.dequantize().to(x.device)
        b = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, precision={self.precision}")


class Int8PerChannelLinear(QuantizedLinear):
    """A layer holding int8 ``qweight`` ``(out, in)`` and ``scales`` ``(out,)`` in ``scale_dtype``
    (symmetric, per output channel: the ``int8_per_channel`` checkpoint layout).

    Subclasses implement :meth:`matmul`, the kernel; the bias is added after it.
    """

    FORMAT: ClassVar[str] = "int8_per_channel"
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        q, scales = int8_per_channel(linear.weight, scale_dtype)
        self.register_buffer("qweight", q.to(linear.weight.device))  # (out, in) int8
        self.register_buffer("scales", scales.to(linear.weight.device))  # (out,) scale_dtype

    def dequantize(self) -> torch.Tensor:
        return int8_dequantize(self.qweight, self.scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) @ (qweight · scales)ᵀ`` → ``(..., out)`` in ``x.dtype``, without the bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y + self.bias if self.bias is not None else y


def flat(x: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` → ``(M, K)`` contiguous on the last dim (what the aten kernels require)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` matches one of the ``fnmatch`` ``patterns`` (``"lm_head"``, ``"*.down_proj"``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tied_weights(model: nn.Module) -> set[int]:
    """ids of weights shared with an ``nn.Embedding`` (a tied output head stays in high precision)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def linear_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` a policy would quantize, in module order."""
    from dsr1.models.packing import refuse_packed

    refuse_packed(model, "quantize")
    patterns, tied = list(skip), tied_weights(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in tied and not skipped(n, patterns)]


def replace_linears_(
    model: nn.Module, make: Callable[[str, nn.Linear], nn.Module], skip: Iterable[str] = ()
) -> list[str]:
    """Replace each quantizable ``nn.Linear`` by ``make(name, linear)``, one layer at a time; returns the names.

    A model that *is* one ``nn.Linear`` cannot be swapped in place: wrap it in a container.
    """
    if isinstance(model, nn.Linear):
        raise Dsr1Error("quantize_ got a bare nn.Linear; pass the model (a module that contains the linear layers)")
    names = []
    for name, linear in linear_layers(model, skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, linear))
        names.append(name)
    return names


def cast_floats_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype``, except inside quantized layers (they set their own)
    and modules that keep their dtype (``keeps_dtype``: an MoE router's fp32 scores pick the experts)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear) or getattr(module, "keeps_dtype", False):
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


def precision_map(model: nn.Module) -> dict[str, str]:
    """Every linear layer (and stack of MoE experts) of ``model`` and the precision it runs in now
    (``"int8"``, ``"bf16"`` ...)."""
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            out[name] = m.precision
        elif getattr(m, "stacked_experts", False) and m.quantized:
            kind = "int8" if m.down_proj_q.dtype == torch.int8 else "fp8"
            out[name] = f"{kind} (weight-only)"
        elif isinstance(m, nn.Linear) or getattr(m, "stacked_experts", False):
            weight = m.weight if isinstance(m, nn.Linear) else m.down_proj
            out[name] = str(weight.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace(
                "float32", "fp32").replace("float16", "fp16")
    return out


def unquantized_experts(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """The MoE expert stacks of ``model`` still in floating point, except those ``skip`` names (fnmatch)."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, "stacked_experts", False)
            and not m.quantized and not any(fnmatch.fnmatch(name, pattern) for pattern in skip)]


def device_type(model: nn.Module) -> str:
    """The device type of the model's first tensor (``"cpu"`` for an empty model)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device.type
    return "cpu"


def refuse_unless_valid(policy: Any, model: nn.Module) -> None:
    """Raise the policy's own ``validate`` reasons for the model's device, as one line."""
    device = device_type(model)
    reasons = policy.validate(device)
    if reasons:
        raise Dsr1Error("; ".join(reasons))

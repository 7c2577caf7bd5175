"""``int4``: weight-only int4, asymmetric, group-wise (``group_size`` 32, 64 or 128).

Each group of ``group_size`` input columns of a row gets ``scale ≥ (max - min) / 15`` and
``zero = min + 8 · scale`` (both in the compute dtype), and its weights become
``q = round((w - zero) / scale) + 8`` in ``[0, 15]``: ``w ≈ (q - 8) · scale + zero``, error at
most half a step plus how far rounding ``zero`` moved the grid (``error_bound``).

The group size must divide every quantized layer's input dim, and the kernels want output dims
in multiples of 16 (CPU) or 8 (CUDA). A layer that does not fit is kept in floating point by
default, with one warning listing every such layer (dsr1-tiny's ``down_proj`` takes 688 inputs,
which no offered group size divides); ``options.unfit: refuse`` makes it a one-line error naming the
first one instead, and ``options.skip`` chooses the floating-point layers explicitly. The layers
kept are recorded in the written checkpoint's ``quantization_config.options.skip``.
Kernels and packing: :mod:`dsr1_quant_int4.kernels` (torch's tinygemm on
CPU and CUDA; other devices are refused with "int4 has no kernel on <device>; use int8").
On CUDA, ``options.cuda_kernel`` picks the decode kernel: ``tinygemm`` (torch's, a one-row kernel) or
``triton`` (the SDK's weight-only kernels, :mod:`dsr1_sdk.kernels.weight_only`: a GEMV for one row and
``tl.dot`` for 2-64 fp16/bf16 rows, over the canonical nibble pairs; more rows dequantize and run cuBLAS).
The two keep the weight in different layouts, so the choice is made when the layer is built (graph
``adaptive`` is offered no switch between them).
torchao is not used: its int4 weight-only config needs the ``mslk`` package, which has no
CPU build, and its CPU path calls the same aten kernel used here.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_quant_int4 import kernels
from dsr1_sdk import Dsr1Error, Field, PluginSpec, hookimpl
from dsr1_sdk.kernels import MAX_ROWS, triton_problem
from dsr1_sdk.quant import (
    QuantizedLinear,
    QuantOptions,
    StaticQuantPolicy,
    device_type,
    flat,
    int4_dequantize,
    int4_error_bound,
    int4_groupwise,
    linear_layers,
    pack_nibbles,
    refuse_unless_valid,
    unpack_nibbles,
)

__all__ = ["Int4Options", "Int4WeightOnly", "Int4WeightOnlyLinear", "dsr1_quant"]

#: per group size: the lowest SQNR (dB) measured on the kit's cases (19.4, 17.6, 16.4) less ~1 dB.
SQNR_THRESHOLDS: dict[int, float] = {32: 18.0, 64: 16.5, 128: 15.5}


class Int4Options(QuantOptions):
    #: input columns per scale/zero pair; must divide each quantized layer's input dim.
    group_size: Literal[32, 64, 128] = Field(64)
    #: a layer the group size or the kernel does not fit: ``keep`` it in floating point (one warning
    #: lists them all) or ``refuse`` the model with a one-line error naming the first.
    unfit: Literal["keep", "refuse"] = Field("keep")
    #: the CUDA decode kernel: ``tinygemm`` (torch's ``_weight_int4pack_mm``) or ``triton`` (the SDK's
    #: weight-only kernels, also at 2-64 rows); ignored on the CPU. The default is this one line.
    cuda_kernel: Literal["tinygemm", "triton"] = Field("tinygemm")


#: activation dtypes the Triton kernels take.
TRITON_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _triton_mm() -> Callable[..., torch.Tensor]:
    """The SDK's Triton op, imported on the first CUDA call (the plugin itself loads without triton)."""
    from dsr1_sdk.kernels.weight_only import weight_only_mm

    return weight_only_mm


class Int4WeightOnlyLinear(QuantizedLinear):
    """``y = x · ((q - 8) · scale + zero)ᵀ + b`` with a packed int4 weight.

    Runtime tensors (not saved), in the layout of the kernel the layer runs (``triton``: on CUDA with
    ``cuda_kernel: triton``; ``tinygemm`` everywhere else): tinygemm keeps ``packed`` in its device
    layout and ``scales_and_zeros`` ``(in / group, out, 2)``; triton keeps ``packed`` as the canonical
    nibble pairs ``(out, in / 2)`` and ``scales_and_zeros`` ``(2, out, in / group)``. ``state_dict``
    holds the canonical ``qweight`` uint8 ``(out, in / 2)``, ``scales`` and ``zeros`` ``(out, in / group)``.
    """

    FORMAT: ClassVar[str] = "int4_groupwise"
    precision = "int4"

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, group: int, cuda_kernel: str = "tinygemm") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        self.group = group
        self.cuda_kernel = cuda_kernel
        q, scales, zeros = int4_groupwise(linear.weight, group, dtype)  # (out, in), (out, G), (out, G)
        self._set(q, scales, zeros, linear.weight.device)

    def _set(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device: torch.device) -> None:
        self.layout = "triton" if device.type == "cuda" and self.cuda_kernel == "triton" else "tinygemm"
        if self.layout == "triton":
            packed = pack_nibbles(q.to(torch.uint8)).to(device)  # (out, in/2)
            sz = torch.stack([scales, zeros]).to(device=device, dtype=self.compute_dtype)  # (2, out, G)
        else:
            packed = kernels.pack(q, device)
            sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(device=device, dtype=self.compute_dtype)  # (G, out, 2)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", sz.contiguous(), persistent=False)

    def canonical(self) -> dict[str, torch.Tensor]:
        """``qweight`` (nibble pairs), ``scales`` and ``zeros`` as a checkpoint stores them (on the CPU)."""
        sz = self.scales_and_zeros.cpu()
        if self.layout == "triton":
            return {"qweight": self.packed.cpu(), "scales": sz[0].contiguous(), "zeros": sz[1].contiguous()}
        q = kernels.unpack(self.packed, self.out_features, self.in_features)  # (out, in) uint8
        return {"qweight": pack_nibbles(q), "scales": sz[..., 0].t().contiguous(),
                "zeros": sz[..., 1].t().contiguous()}

    def dequantize(self) -> torch.Tensor:
        c = self.canonical()
        return int4_dequantize(unpack_nibbles(c["qweight"]), c["scales"], c["zeros"], self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flat(x).contiguous()  # (M, in)
        if self.layout == "tinygemm":
            y = kernels.matmul(x2, self.packed, self.group, self.scales_and_zeros)  # (M, out)
        elif x2.shape[0] <= MAX_ROWS and x2.dtype in TRITON_DTYPES:
            sz = self.scales_and_zeros
            y = _triton_mm()(x2, "int4", self.packed, sz[0], sz[1], self.group)  # (M, out)
        else:  # prefill: compute-bound, dequantize once and run cuBLAS
            s, z = self.scales_and_zeros[0], self.scales_and_zeros[1]
            w = int4_dequantize(unpack_nibbles(self.packed), s, z, self.group).to(x2.dtype)  # (out, in)
            y = F.linear(x2, w)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        for key, t in self.canonical().items():
            destination[prefix + key] = t

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        ours = {k: prefix + k for k in ("qweight", "scales", "zeros")}
        rest = {k: v for k, v in state_dict.items() if k not in ours.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        absent = [full for full in ours.values() if full not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        q = unpack_nibbles(state_dict[ours["qweight"]].cpu())
        scales, zeros = state_dict[ours["scales"]], state_dict[ours["zeros"]]
        groups = -(-self.in_features // self.group)
        if q.shape != (self.out_features, self.in_features) or tuple(scales.shape) != (self.out_features, groups):
            error_msgs.append(f"int4 layer {prefix!r}: stored qweight {tuple(q.shape)} / scales "
                              f"{tuple(scales.shape)} do not fit ({self.out_features}, {self.in_features}) "
                              f"with group {self.group}")
            return
        self._set(q, scales.cpu(), zeros.cpu(), self.packed.device)


class Int4WeightOnly(StaticQuantPolicy):
    """Weight-only int4 of every linear layer, group-wise scales and zeros."""

    Options = Int4Options
    name = "int4"
    distribution = "dsr1-quant-int4"
    FORMAT = "int4_groupwise"
    options: Int4Options

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.sqnr_threshold = SQNR_THRESHOLDS[self.options.group_size]

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        if device == "cpu":
            return []
        if device != "cuda":
            return [f"int4 has no kernel on {device}; use int8"]
        if not torch.cuda.is_available():
            return ["int4 on cuda: no CUDA device is visible; use int8 on the CPU"]
        major, minor = torch.cuda.get_device_capability()
        kernel = self.options.cuda_kernel
        if major < 8:
            return [f"int4 has no kernel on cuda sm{major}{minor} ({kernel} needs compute capability 8.0+); use int8"]
        problem = triton_problem("int4 cuda_kernel 'triton'") if kernel == "triton" else None
        return [f"{problem}, or set options.cuda_kernel: tinygemm"] if problem else []

    def unfit_layers(self, model: nn.Module) -> dict[str, str]:
        """Layers (not skipped) that the group size or the device's kernel does not fit, each with why."""
        g, device = self.options.group_size, device_type(model)
        unfit: dict[str, str] = {}
        for name, linear in linear_layers(model, self.options.skip):
            k, n = linear.in_features, linear.out_features
            if k % g:
                fits = [str(s) for s in kernels.GROUP_SIZES if k % s == 0]
                hint = f"use group_size {' or '.join(fits)}, or" if fits else "no group size of 32/64/128 divides it:"
                unfit[name] = (f"int4 group_size {g} does not divide the input dim {k} of layer {name!r}; {hint} "
                               f"keep the layer in floating point with options.skip")
            elif device == "cpu" and n % 16:
                unfit[name] = (f"int4 on cpu needs output dims in multiples of 16; layer {name!r} has {n}: "
                               f"keep it in floating point with options.skip")
            elif device == "cuda" and self.options.cuda_kernel == "tinygemm" and (
                    kernels.cuda_inner_k_tiles(k) is None or n % 8):
                unfit[name] = (f"int4 on cuda needs input dims in multiples of 32 and output dims in multiples "
                               f"of 8; layer {name!r} is {k}->{n}: keep it in floating point with options.skip")
        return unfit

    def check_layers(self, model: nn.Module) -> None:
        """With ``unfit: refuse``, the first layer the group size or kernel does not fit is an error."""
        if self.options.unfit == "refuse":
            unfit = self.unfit_layers(model)
            if unfit:
                raise Dsr1Error(next(iter(unfit.values())))

    def quantize_(self, model: nn.Module) -> nn.Module:
        """As every static policy; with ``unfit: keep`` (the default) the layers that do not fit join
        ``skip`` for this call (one warning names them), so the checkpoint records them."""
        refuse_unless_valid(self, model)
        unfit = {} if self.options.unfit == "refuse" else self.unfit_layers(model)
        if not unfit:
            return super().quantize_(model)
        names = list(unfit)
        shown = ", ".join(names) if len(names) <= 8 else ", ".join(names[:8]) + f", ... ({len(names) - 8} more)"
        warnings.warn(f"int4 keeps {len(names)} linear layer(s) in floating point that group_size "
                      f"{self.options.group_size} or the kernel does not fit: {shown} (first: {unfit[names[0]]}); "
                      f"set options.skip to choose, or options.unfit: refuse to make this an error",
                      UserWarning, stacklevel=2)
        asked = self.options
        self.options = asked.model_copy(update={"skip": [*asked.skip, *names]})
        try:
            return super().quantize_(model)
        finally:
            self.options = asked

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        return Int4WeightOnlyLinear(linear, self.compute_dtype(), self.options.group_size, self.options.cuda_kernel)

    def kernel_choices(self, device: Any) -> Sequence[str]:
        """None for graph ``adaptive``: tinygemm and triton keep the weight in different layouts, so the layer's
        kernel is fixed when it is built (``options.cuda_kernel``); switching would repack every weight under
        graphs captured on the old buffers."""
        return []

    def use_kernel_(self, model: nn.Module, kernel: str) -> None:
        raise Dsr1Error(f"int4 cannot switch its layers to kernel {kernel!r} after quantizing; set "
                        f"options.cuda_kernel: {kernel}")

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.options.group_size
        q, scales, zeros = int4_groupwise(weight, g, self.compute_dtype())
        return int4_dequantize(q, scales, zeros, g).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half a step of each group, plus the shift from rounding its zero, plus float slack."""
        return int4_error_bound(weight, self.options.group_size, self.compute_dtype())


@hookimpl
def dsr1_quant() -> PluginSpec:
    return PluginSpec(
        name="int4", family="quant", impl=Int4WeightOnly, options=Int4Options,
        capabilities=frozenset({"weight_only", "group_wise", "save", "device:cpu", "device:cuda"}),
        description=("weight-only int4, asymmetric group-wise (32/64/128), torch tinygemm kernels (CPU, CUDA sm80+) "
                     "or Triton on CUDA"),
    )

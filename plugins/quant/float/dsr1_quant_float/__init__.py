"""``fp32``, ``fp16``, ``bf16``: precision policies that cast the model to one float dtype.

``quantize_`` casts every floating parameter and buffer in place (integer buffers, such
as position ids, are left alone) and the model then computes in that dtype
(``compute_dtype``). The round trip the conformance kit checks is the cast there and
back, whose error is at most half a unit in the last place of the target dtype
(``error_bound``).

Declared SQNR thresholds (dB, of the round trip against fp32 on the kit's cases):
fp32 150 (the round trip is exact), fp16 60 (11 significant bits: 73-75 dB measured on
the kit's cases), bf16 40 (8 significant bits: 55-57 dB measured).

``fp16`` and ``bf16`` with ``options.cpu_kernel: gemv`` (the default) run their linear layers on the CPU
through :class:`GemvLinear`: calls of up to :data:`dsr1_sdk.kernels.cpu.MAX_ROWS` rows (decode) go
through the SDK's CPU GEMV (:mod:`dsr1_sdk.kernels.cpu`), which reads the 16-bit weight once and
converts it in registers (F16C / AVX-512); torch's fp16 and bf16 matmuls on CPUs without
AVX512-BF16 / AVX512-FP16 run far slower than its fp32 one. Larger calls (prefill) run torch's matmul in
the dtype where oneDNN has a native kernel for it here (``_is_mkldnn_bf16_supported`` /
``_is_mkldnn_fp16_supported``), else the GEMV in passes of 8 rows: torch's fp16 matmul without
AVX512-FP16 is pathologically slow at prefill sizes, and the passes were also faster than
converting the weight to fp32 for an fp32 GEMM (``bench/results/cpu-gemv/README.md``).
``cpu_kernel: torch`` keeps ``F.linear`` for every call. Where the kernel cannot be built, one
warning says so and ``F.linear`` runs.

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
from dsr1_sdk.kernels import cpu as cpu_kernels
from dsr1_sdk.kernels import triton_problem
from dsr1_sdk.quant import refuse_unless_valid, replace_linears_
from dsr1_sdk.reference.quant import cast_error_bound

__all__ = ["Bf16Cast", "Bf16Options", "FloatCast", "Fp16Cast", "Fp16Options", "Fp32Cast", "GemvLinear", "dsr1_quant"]


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

    @staticmethod
    def gemv_linears_(model: torch.nn.Module, cuda_triton: bool, cpu_gemv: bool) -> None:
        """Run ``model``'s linear layers as :class:`GemvLinear` sharing their parameters, where a kernel is on.
        A bare layer keeps ``F.linear`` on the CPU: nothing holds a replacement of it."""
        if cuda_triton or (cpu_gemv and not isinstance(model, nn.Linear)):
            replace_linears_(model, lambda name, linear: GemvLinear.sharing(linear, cuda_triton, cpu_gemv))


class Fp32Cast(FloatCast):
    dtype = torch.float32
    sqnr_threshold = 150.0


CpuKernel = Literal["gemv", "torch"]


class Fp16Options(PluginOptions):
    #: ``gemv``: linear layers on the CPU through the SDK's CPU GEMV (see the module docstring); ``torch``:
    #: ``F.linear`` in fp16 for every call.
    cpu_kernel: CpuKernel = Field("gemv")


class Bf16Options(PluginOptions):
    #: ``cublas``: torch's matmul for every call; ``triton``: one-row calls on CUDA through the SDK's Triton GEMV.
    cuda_kernel: Literal["cublas", "triton"] = Field("cublas")
    #: ``gemv``: linear layers on the CPU through the SDK's CPU GEMV (see the module docstring); ``torch``:
    #: ``F.linear`` in bf16 for every call.
    cpu_kernel: CpuKernel = Field("gemv")


@functools.cache
def _triton_mm() -> Callable[..., torch.Tensor]:
    """The SDK's Triton op, imported on the first CUDA call (the plugin itself loads without triton)."""
    from dsr1_sdk.kernels.weight_only import weight_only_mm

    return weight_only_mm


#: the SDK's CPU GEMV format of each 16-bit weight dtype.
_CPU_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


#: whether oneDNN has a native matmul for the dtype on this CPU (AVX512-BF16 / AMX for bf16, AVX512-FP16 / AMX
#: for fp16); without one torch's 16-bit CPU matmul runs far below the fp32 one. Filled on the first CPU call.
_TORCH_IS_FAST: dict[torch.dtype, bool] = {}


def _torch_is_fast(dtype: torch.dtype) -> bool:
    if dtype not in _TORCH_IS_FAST:
        try:
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
                torch.ops.mkldnn._is_mkldnn_fp16_supported
            _TORCH_IS_FAST[dtype] = bool(native())
        except (AttributeError, RuntimeError):  # a torch built without oneDNN
            _TORCH_IS_FAST[dtype] = False
    return _TORCH_IS_FAST[dtype]


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose bf16/fp16 calls run the SDK's GEMVs: one-row
    CUDA calls the Triton GEMV (``cuda_triton``), CPU calls the CPU GEMV (``cpu_gemv``; see the module docstring)."""

    cuda_triton: bool = True
    cpu_gemv: bool = False

    @classmethod
    def sharing(cls, linear: nn.Linear, cuda_triton: bool = True, cpu_gemv: bool = False) -> GemvLinear:
        """A GemvLinear holding ``linear``'s own parameters (no copy; a tied weight stays tied)."""
        with torch.device("meta"):
            gemv = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        weight = linear.weight
        if cpu_gemv and weight.device.type == "cpu" and not weight.is_contiguous():
            # the CPU builders keep weights (in, out) under an (out, in) view (MKL's fast one-row layout); the
            # GEMV reads rows of (out, in) and would copy the whole matrix on every call: re-laid once here
            weight = nn.Parameter(weight.detach().contiguous(), requires_grad=weight.requires_grad)
        gemv.weight = weight
        gemv.bias = linear.bias
        gemv.cuda_triton, gemv.cpu_gemv = cuda_triton, cpu_gemv
        return gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.cpu_gemv and x.device.type == "cpu" and x.dtype == w.dtype and w.dtype in _CPU_FORMATS:
            x2 = x.reshape(-1, self.in_features)  # (M, in)
            if (x2.shape[0] <= cpu_kernels.MAX_ROWS or not _torch_is_fast(w.dtype)) and \
                    cpu_kernels.usable(_CPU_FORMATS[w.dtype], "F.linear"):
                y = cpu_kernels.gemv(x2, _CPU_FORMATS[w.dtype], w)  # (M, out) in x.dtype
                y = y.reshape(*x.shape[:-1], self.out_features)  # (..., out)
                return y if self.bias is None else y + self.bias
        elif self.cuda_triton and x.is_cuda and x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            y = _triton_mm()(x.reshape(1, -1), "bf16", w, None, None, 0)  # (1, out): decode at batch 1
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


class Fp16Cast(FloatCast):
    dtype = torch.float16
    sqnr_threshold = 60.0
    Options = Fp16Options
    options: Fp16Options

    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().quantize_(model)
        self.gemv_linears_(model, cuda_triton=False, cpu_gemv=self.options.cpu_kernel == "gemv")
        return model


class Bf16Cast(FloatCast):
    dtype = torch.bfloat16
    sqnr_threshold = 40.0
    Options = Bf16Options
    options: Bf16Options

    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().quantize_(model)
        triton, cpu = self.options.cuda_kernel == "triton", self.options.cpu_kernel == "gemv"
        if triton:
            refuse_unless_valid(self, model)
        self.gemv_linears_(model, cuda_triton=triton, cpu_gemv=cpu)
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
        PluginSpec(name="fp16", family="quant", impl=Fp16Cast, options=Fp16Options, capabilities=frozenset({"cast"}),
                   description="cast the model to float16 and compute in float16"),
        PluginSpec(name="bf16", family="quant", impl=Bf16Cast, options=Bf16Options, capabilities=frozenset({"cast"}),
                   description="cast the model to bfloat16 and compute in bfloat16"),
    ]

"""``fp8``: float8 e4m3 weights with one fp32 scale per output channel, e4m3 activations.

Weights: ``scale = max|w_row| / 448`` (e4m3's largest finite value), ``qweight = w / scale``
cast to ``float8_e4m3fn`` (3 mantissa bits: relative error ≤ 2⁻⁴). Activations: one dynamic
scale per call (``max|x| / 448``, tensor-wise). The matmul is ``torch._scaled_mm`` (fp8 tensor
cores) with the activation scale, then the per-channel weight scale on its output:
``y = (x_q · qweightᵀ) · s_x · s_w``. Tensor-wise ``_scaled_mm`` runs on compute capability
8.9 (Ada) and 9.0 (Hopper); ``_scaled_mm`` wants K and N in multiples of 16 (and M is padded
to 16).

``options.cuda_kernel: triton`` makes the layers weight-only instead: activations stay in the compute
dtype and the SDK's Triton kernels (:mod:`dsr1_sdk.kernels.weight_only`) read the e4m3 bytes and
dequantize them in registers (a GEMV for one row, ``tl.dot`` for 2-64 fp16/bf16 rows; more rows
dequantize the weight and run cuBLAS). Decode reads one byte per weight either way; this path skips
quantizing the activations and runs on any GPU of compute capability 8.0+, and graph ``adaptive`` may
switch between the two per bucket (same weight buffers) where both run.

GPU only: ``validate`` refuses every other device, and a GPU older than the kernel needs, with the
reason. Not measured (no device budget); the CPU tests check the quantization math, the
reference path and the checkpoint layout. The weight is held as a uint8 view of its bytes,
so ``model.to(dtype)`` never upcasts it.

A model built from a block-scaled fp8 checkpoint (DeepSeek's ``quant_method: fp8`` with
``weight_block_size``) keeps the checkpoint's own e4m3 values and block scales instead:
re-quantizing its dequantized weights per channel would change them. Each fp8 layer becomes a
:class:`BlockFp8Linear`; the layers the checkpoint stores in floating point stay so. That layer
dequantizes per block on the fly (any device: the reference), or, on a GPU whose torch passes
:func:`blockwise_kernel_works`, runs the blockwise ``torch._scaled_mm`` on DeepSeek's 128×128 grid.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dsr1_sdk import Dsr1Error, Field, PluginSpec, hookimpl
from dsr1_sdk.kernels import MAX_ROWS, triton_problem
from dsr1_sdk.quant import (
    FP8_E4M3_MAX,
    QuantizedLinear,
    QuantOptions,
    StaticQuantPolicy,
    block_dequantize,
    block_fp8_reader,
    block_quantize,
    block_row_scales,
    cast_floats_,
    flat,
    fp8_dequantize,
    fp8_error_bound,
    fp8_per_channel,
    fused_modules,
    hf_sources,
    linear_layers,
    replace_linears_,
)

__all__ = ["BlockFp8Linear", "Fp8E4M3", "Fp8Linear", "block_fp8_linear", "blockwise_kernel_works", "dsr1_quant",
           "fp8_linear", "kernel_grid"]

#: compute capability ``torch._scaled_mm`` needs for e4m3; the Triton weight-only kernels need bf16 (8.0).
MIN_CAPABILITY = (8, 9)
TRITON_MIN_CAPABILITY = (8, 0)
#: the CUDA kernels of :class:`Fp8Linear` (see :class:`Fp8Options`).
CudaKernel = Literal["scaled_mm", "triton"]
CUDA_KERNELS: tuple[str, ...] = get_args(CudaKernel)
TRITON_DTYPES = (torch.float16, torch.bfloat16)


class Fp8Options(QuantOptions):
    #: ``scaled_mm``: e4m3 activations too, fp8 tensor cores (``torch._scaled_mm``, sm89+); ``triton``:
    #: weight-only, the SDK's Triton kernels read the e4m3 weight and keep activations in the compute dtype.
    cuda_kernel: CudaKernel = Field("scaled_mm")


@functools.cache
def _triton_mm() -> Callable[..., torch.Tensor]:
    """The SDK's Triton op, imported on the first CUDA call (the plugin itself loads without triton)."""
    from dsr1_sdk.kernels.weight_only import weight_only_mm

    return weight_only_mm


def fp8_weight_only_linear(x: torch.Tensor, qweight_bytes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` times the e4m3 weight (its bytes, ``(out, in)``) with per-channel ``scales``, activations
    unquantized → ``(..., out)`` in ``x.dtype``: Triton up to ``MAX_ROWS`` fp16/bf16 rows, else dequantize + GEMM."""
    x2 = flat(x)  # (M, in)
    if x2.shape[0] <= MAX_ROWS and x2.dtype in TRITON_DTYPES:
        y = _triton_mm()(x2, "fp8", qweight_bytes, scales, None, 0)  # (M, out)
    else:
        w = qweight_bytes.view(torch.float8_e4m3fn).to(x2.dtype) * scales.to(x2.dtype)[:, None]  # (out, in)
        y = F.linear(x2, w)
    return y.reshape(*x.shape[:-1], qweight_bytes.shape[0])


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

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, cuda_kernel: str = "scaled_mm") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        self.cuda_kernel = cuda_kernel
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
        if self.cuda_kernel == "triton":
            y = fp8_weight_only_linear(x, self.qweight_bytes, self.scales)
        else:
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


#: the block ``torch._scaled_mm`` takes blockwise weight scales for (DeepSeek's), with 1×128 activation blocks.
KERNEL_BLOCK = 128
_KERNEL_WORKS: dict[torch.device, bool] = {}


def _e4m3_per_block(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, K)`` activations → e4m3 ``(M, K)`` and fp32 scales ``(M, K / 128)``, one per 128 columns of a row."""
    m, k = x2.shape
    xb = x2.float().view(m, k // KERNEL_BLOCK, KERNEL_BLOCK)  # (M, K/128, 128)
    xs = (xb.abs().amax(dim=-1) / FP8_E4M3_MAX).clamp_min(1e-12)  # (M, K/128)
    xq = (xb / xs[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(m, k)
    return xq, xs


def kernel_grid(grid: torch.Tensor) -> torch.Tensor:
    """``(out/128, in/128)`` block scales as the kernel reads them: rows padded to a multiple of 4 floats
    (the blockwise ``_scaled_mm`` reads them 16-byte aligned and checks nothing: unpadded rows give
    garbage whenever ``in/128`` is not a multiple of 4). A dense tensor, so ``.to(device)`` keeps the padding."""
    rows, cols = grid.shape
    padded = torch.zeros(rows, -(-cols // 4) * 4, dtype=torch.float32, device=grid.device)  # (out/128, in/128 → 4k)
    padded[:, :cols] = grid
    return padded


def block_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` × e4m3 ``qweight (out, in)`` with 128×128 block scales on CUDA, ``grid`` as
    :func:`kernel_grid` lays them out.

    Activations are quantized per token and 128 columns (DeepSeek's scheme); ``torch._scaled_mm``
    wants the activation scales outer-dim-major and the weight's as the transposed grid.
    """
    x2 = flat(x)  # (M, in)
    m = x2.shape[0]
    xq, xs = _e4m3_per_block(x2)
    if m % 16:  # rows padded to the kernel's multiple of 16 (zeros, scale 1)
        xq = F.pad(xq.view(torch.uint8), (0, 0, 0, 16 - m % 16)).view(torch.float8_e4m3fn)  # (M16, in)
        xs = F.pad(xs, (0, 0, 0, 16 - m % 16), value=1.0)  # (M16, in/128)
    scale_b = grid[:, : qweight.shape[1] // KERNEL_BLOCK].t()  # (in/128, out/128), rows 16-byte aligned
    y = torch._scaled_mm(xq, qweight.t(), scale_a=xs.t().contiguous().t(), scale_b=scale_b,
                         out_dtype=x.dtype)[:m]  # (M, out)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def blockwise_kernel_works(device: torch.device) -> bool:
    """Whether this torch runs :func:`block_fp8_linear` on ``device`` and agrees with the reference: checked once
    per device on small products (the blockwise ``_scaled_mm`` forms depend on the torch version and the GPU)."""
    if device.type != "cuda":
        return False
    if device not in _KERNEL_WORKS:
        _KERNEL_WORKS[device] = all(_kernel_agrees(device, *dims) for dims in ((3, 2, 5), (1, 3, 14), (40, 4, 4)))
    return _KERNEL_WORKS[device]


def _kernel_agrees(device: torch.device, m: int, out_blocks: int, in_blocks: int) -> bool:
    """One ``(m, in) × (out, in)ᵀ`` product through the kernel against the fp32 reference."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_blocks * KERNEL_BLOCK, in_blocks * KERNEL_BLOCK, generator=gen)
    x = torch.randn(m, in_blocks * KERNEL_BLOCK, generator=gen)
    q, grid = block_quantize(w, (KERNEL_BLOCK, KERNEL_BLOCK))
    want = x @ block_dequantize(q, grid, (KERNEL_BLOCK, KERNEL_BLOCK)).t()  # (m, out) fp32 reference
    try:
        got = block_fp8_linear(x.to(device, torch.bfloat16), q.to(device), kernel_grid(grid.to(device)))
    except RuntimeError:  # this torch or GPU has no such blockwise form
        return False
    # activation rounding (e4m3) and the bf16 output stay well inside this
    return bool((got.float().cpu() - want).norm() <= 0.05 * want.norm())


class BlockFp8Linear(QuantizedLinear):
    """A block-fp8 checkpoint's layer as stored: ``y = x · (qweight · s)ᵀ + b``.

    ``qweight`` e4m3 ``(out, in)``; ``scales`` fp32 ``(out, ceil(in / block_cols))``, the checkpoint's
    ``(ceil(out / bo), ceil(in / bi))`` block scales spread over the rows, so the parts of a fused
    layer (q/k/v, gate/up) stack along the rows whatever their sizes. The reference path
    dequantizes the weight to the compute dtype on the fly, on every device. On a GPU where
    :func:`blockwise_kernel_works`, a layer whose scales form a 128×128 grid (DeepSeek's block,
    dims and fused parts in multiples of 128) runs :func:`block_fp8_linear` on that grid instead.
    """

    FORMAT: ClassVar[str] = "fp8_e4m3_block"
    precision = "fp8"

    def __init__(self, linear: nn.Linear, qweight: torch.Tensor, scales: torch.Tensor, block_cols: int,
                 dtype: torch.dtype) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        self.block_cols = block_cols
        device = linear.weight.device
        self.register_buffer("qweight_bytes", qweight.view(torch.uint8).to(device), persistent=False)  # (out, in)
        self.register_buffer("scales", scales.float().to(device))  # (out, ceil(in / block_cols)) fp32
        grid = self._kernel_grid() if blockwise_kernel_works(device) else None
        self.register_buffer("grid", grid, persistent=False)  # (out/128, in/128 padded) fp32, or None

    def _kernel_grid(self) -> torch.Tensor | None:
        """The 128×128 block scales behind the row scales, when there are such (each 128 rows share theirs)."""
        out, nb = self.scales.shape
        if self.block_cols != KERNEL_BLOCK or out % KERNEL_BLOCK or self.in_features % KERNEL_BLOCK:
            return None
        grid = self.scales[::KERNEL_BLOCK]  # (out/128, in/128)
        same = self.scales.view(out // KERNEL_BLOCK, KERNEL_BLOCK, nb).eq(grid[:, None]).all()  # (out/128, 128, nb)
        return kernel_grid(grid) if bool(same) else None

    @property
    def qweight(self) -> torch.Tensor:
        """The e4m3 weight ``(out, in)`` (a view of ``qweight_bytes``)."""
        return self.qweight_bytes.view(torch.float8_e4m3fn)

    def dequantize(self) -> torch.Tensor:
        return block_dequantize(self.qweight, self.scales, (1, self.block_cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None and x.is_cuda:
            y = block_fp8_linear(x, self.qweight, self.grid)
            return y + self.bias if self.bias is not None else y
        w = block_dequantize(self.qweight, self.scales, (1, self.block_cols), x.dtype)  # (out, in)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_cols={self.block_cols}"

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # scales, bias
        destination[prefix + "qweight"] = self.qweight


class Fp8E4M3(StaticQuantPolicy):
    """float8 e4m3 weights and activations on NVIDIA GPUs of compute capability 8.9 or newer (or e4m3 weights
    only, ``cuda_kernel: triton``, on 8.0 or newer)."""

    Options = Fp8Options
    options: Fp8Options
    name = "fp8"
    distribution = "dsr1-quant-fp8"
    FORMAT = "fp8_e4m3_per_channel"
    #: measured 31.5-32.9 dB on the kit's cases (e4m3 keeps 3 mantissa bits).
    sqnr_threshold = 30.0

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        if self.options.cuda_kernel == "triton" and (device != "cuda" or not torch.cuda.is_available()):
            where = f"{device} has none" if device != "cuda" else "no CUDA device is visible"
            return [f"fp8 cuda_kernel 'triton' needs an NVIDIA GPU of compute capability 8.0+; {where}: use int8"]
        if device != "cuda":
            return [f"fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper) for torch._scaled_mm; "
                    f"{device} has no fp8 matmul: use int8"]
        if not torch.cuda.is_available():
            return ["fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9+; no CUDA device is visible: use int8"]
        cap = torch.cuda.get_device_capability()
        if self.options.cuda_kernel == "triton":
            if cap < TRITON_MIN_CAPABILITY:
                return [f"fp8 cuda_kernel 'triton' needs compute capability 8.0+; {torch.cuda.get_device_name()} is "
                        f"sm{cap[0]}{cap[1]}: use int8"]
            problem = triton_problem("fp8 cuda_kernel 'triton'")
            return [f"{problem}, or set options.cuda_kernel: scaled_mm"] if problem else []
        if cap < MIN_CAPABILITY:
            return [f"fp8 e4m3 needs compute capability 8.9+ (Ada, Hopper); {torch.cuda.get_device_name()} is "
                    f"sm{cap[0]}{cap[1]}, without fp8 tensor cores: use int8"]
        return []

    def check_layers(self, model: nn.Module) -> None:
        """Both kernels take the same layers (the Triton one needs no multiple of 16, but graph ``adaptive``
        may switch a model to ``scaled_mm``)."""
        for name, linear in linear_layers(model, self.options.skip):
            if linear.in_features % 16 or linear.out_features % 16:
                raise Dsr1Error(f"fp8 needs in/out features in multiples of 16 (torch._scaled_mm); layer {name!r} "
                                f"is {linear.in_features}->{linear.out_features}: keep it in floating point with "
                                f"options.skip")

    def make_layer(self, name: str, linear: nn.Linear) -> QuantizedLinear:
        return Fp8Linear(linear, self.compute_dtype(), self.options.cuda_kernel)

    def kernel_choices(self, device: Any) -> Sequence[str]:
        """What graph ``adaptive`` may try per bucket: both kernels on a CUDA GPU that runs both (same buffers:
        switching sets an attribute), else nothing to choose."""
        if device.torch_device_type != "cuda" or triton_problem("fp8") or not torch.cuda.is_available():
            return []
        return list(CUDA_KERNELS) if torch.cuda.get_device_capability() >= MIN_CAPABILITY else []

    def use_kernel_(self, model: nn.Module, kernel: str) -> None:
        if kernel not in CUDA_KERNELS:
            raise Dsr1Error(f"fp8 has no cuda_kernel {kernel!r}; use one of {', '.join(CUDA_KERNELS)}")
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                module.cuda_kernel = kernel

    def quantize_experts_(self, name: str, experts: nn.Module) -> None:
        """MoE experts take e4m3 weights per output row too (weight-only: activations stay in the compute dtype)."""
        experts.quantize_(fp8_per_channel)

    def quantize_(self, model: nn.Module) -> nn.Module:
        """Per channel from the float weights; a model built from a block-fp8 checkpoint keeps its stored ones."""
        reader = block_fp8_reader(model)
        if reader is None:
            return super().quantize_(model)
        try:
            return self._keep_blocks_(model, reader)
        finally:
            reader.close()

    def _keep_blocks_(self, model: nn.Module, reader: Any) -> nn.Module:
        """Each layer the checkpoint stores in block fp8 → :class:`BlockFp8Linear` with its stored values."""
        fused, rows, cols = fused_modules(model), *reader.block
        stored: dict[str, BlockFp8Linear] = {}
        moved: list[str] = []  # layers whose weight the model builder rearranged after reading (rope rows ...)
        with torch.no_grad():
            for name, linear in linear_layers(model, self.options.skip):
                sources = [f"{s}.weight" for s in hf_sources(name, fused)]
                pairs = [reader.read_block_fp8(s, linear.weight.device) for s in sources]
                if all(p is None for p in pairs):
                    continue  # stored in floating point: the checkpoint's author kept it so
                if any(p is None for p in pairs):
                    plain = sources[pairs.index(None)]
                    raise Dsr1Error(f"fused layer {name!r} mixes block-fp8 and floating-point parts in the checkpoint "
                                    f"({plain!r} is not fp8): keep it in floating point with options.skip")
                q = torch.cat([p[0] for p in pairs if p is not None], dim=0)  # (sum of outs, in)
                scales = torch.cat([block_row_scales(p[1], (rows, cols), p[0].shape[0])
                                    for p in pairs if p is not None], dim=0)  # (sum of outs, ceil(in / cols))
                # the stored values are the model's only if the builder used them as read (fused by rows at most)
                same = tuple(q.shape) == tuple(linear.weight.shape) and torch.equal(
                    block_dequantize(q, scales, (1, cols), linear.weight.dtype), linear.weight)
                if same:
                    stored[name] = BlockFp8Linear(linear, q, scales, cols, self.compute_dtype())
                else:
                    moved.append(name)
                del q, scales, pairs
            if moved:  # said, not silent: the precision map lists them as floating point too
                warnings.warn(f"quant {self.name!r}: {len(moved)} layer(s) differ from their block-fp8 checkpoint "
                              f"tensors as the model builder laid them out (e.g. {moved[0]!r}); they keep the "
                              f"dequantized weights in {self.options.compute_dtype}", stacklevel=2)
            experts = [n for n, m in model.named_modules() if getattr(m, "stacked_experts", False)]
            if experts:  # the MoE module stacks its experts at load: it has no block-fp8 layout (yet)
                warnings.warn(f"quant {self.name!r}: the routed experts of {len(experts)} MoE layer(s) keep the "
                              f"block-fp8 checkpoint's weights dequantized, in {self.options.compute_dtype}",
                              stacklevel=2)
            if not stored:
                raise Dsr1Error(f"quant {self.name!r}: the block-fp8 checkpoint in {str(reader.model_dir)!r} "
                                f"stores no linear layer of this model in fp8 (skip={self.options.skip})")
            replace_linears_(model, lambda name, linear: stored.pop(name, linear), self.options.skip)
            cast_floats_(model, self.compute_dtype())
        model.quantization_config = {**self.quantization_config(), "format": BlockFp8Linear.FORMAT,
                                     "weight_block_size": [rows, cols]}
        return model

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
        description=("float8 e4m3 weights (per channel) and activations (dynamic), torch._scaled_mm on sm89+; or "
                     "weight-only through Triton (cuda_kernel: triton, sm80+)"),
    )

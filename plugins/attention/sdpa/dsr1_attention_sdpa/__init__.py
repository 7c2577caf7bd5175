"""``sdpa``: attention through ``torch.nn.functional.scaled_dot_product_attention``.

torch picks the fastest kernel it has for the inputs (flash, memory-efficient, cuDNN or
the math fallback on CUDA; a fused flash-style kernel on CPU). The ``backend`` option
pins one of them on CUDA through ``torch.nn.attention.sdpa_kernel``; ``validate`` refuses
a CUDA-only backend on another device, with the reason.

How the engine's calls map onto SDPA (``q (B, H, T, D)``, ``k, v (B, Hkv, S, D)``):

* ``mask is None, T == S``  → ``is_causal=True`` (no mask tensor is built);
* ``mask is None, T == 1``  → no mask (one decode query sees every key);
* ``mask is None, 1 < T < S`` → a ``(T, S)`` lower-right causal mask (chunked prefill);
  SDPA's own ``is_causal`` is upper-left aligned and would be wrong here;
* boolean ``mask (B, 1, T, S)`` → passed as ``attn_mask`` (``True`` = may attend).

Grouped-query attention passes ``enable_gqa=True`` (torch ≥ 2.5), except with the pinned
``efficient`` kernel, which lacks it: there (and on older torch) key/value heads are
repeated. On an H200 with torch 2.11, native GQA decodes about 2× faster than repeated
heads (see the README for the figures and the command).

One exception to "through SDPA": a one-query CPU call without a mask (decode) goes to the SDK's
decode attention (:func:`dsr1_sdk.kernels.cpu.decode_attention`) while ``cpu_decode`` is
``kernel`` and ``backend`` is ``auto``. torch's CPU kernel is built for blocks of queries; for one
query against a cache of a few hundred keys its set-up per call cost more than the arithmetic, and
decode calls it once per layer and token. Where the kernel cannot build, one warning says so and
SDPA runs.

The same on CUDA: a one-query call (decode) with backend ``auto``, fp16/bf16, and no mask or a boolean
``(B, 1, 1, S)`` one goes to the SDK's split-key decode attention
(:func:`dsr1_sdk.kernels.decode_attention.decode_attention`) while ``cuda_decode`` is ``kernel``. torch's
kernels give each key/value head one thread block, so batch-1 decode ran a few blocks on the whole GPU, and the
captured step's validity mask kept flash out. Without triton, one warning says so and SDPA runs.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.attention
import torch.nn.functional as F

from dsr1_sdk import AttentionMechanism, Dsr1Error, Field, PluginOptions, PluginSpec, hookimpl
from dsr1_sdk.kernels import cpu as cpu_kernels
from dsr1_sdk.kernels import triton_problem

__all__ = ["SdpaAttention", "SdpaOptions", "dsr1_attention"]

Backend = Literal["auto", "flash", "efficient", "cudnn", "math"]

#: Backends that exist only as CUDA kernels.
CUDA_ONLY: frozenset[str] = frozenset({"flash", "efficient", "cudnn"})
#: Backends that compute in fp16/bf16 only.
HALF_ONLY: frozenset[str] = frozenset({"flash", "cudnn"})


#: ``auto``'s kernels for CUDA prefill (more than one query per row): every one but cuDNN, whose
#: per-shape plan building dominates prompts of varying length (see ``SdpaAttention._sdpa``).
AUTO_PREFILL = [
    torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    torch.nn.attention.SDPBackend.MATH,
]

#: ``enable_gqa`` appeared in torch 2.5 (``torch.__version__`` compares as a version).
HAS_ENABLE_GQA = torch.__version__ >= "2.5"


#: the SDK's CUDA decode attention once loaded (None: not asked yet; False: triton is missing, warned once).
_CUDA_DECODE: dict[str, Any] = {}


def _cuda_decode() -> Callable[..., torch.Tensor] | None:
    """The SDK's CUDA decode attention, imported on the first CUDA call (an eager prefill, before a compiled
    decode step is traced); None, with one warning, where triton is missing. A dict read after that."""
    if "fn" not in _CUDA_DECODE:
        problem = triton_problem("sdpa cuda_decode 'kernel'")
        if problem is None:
            from dsr1_sdk.kernels.decode_attention import decode_attention

            _CUDA_DECODE["fn"] = decode_attention
        else:
            warnings.warn(f"{problem}; CUDA decode keeps torch's scaled_dot_product_attention", stacklevel=3)
            _CUDA_DECODE["fn"] = None
    return _CUDA_DECODE["fn"]


class SdpaOptions(PluginOptions):
    """Options of the ``sdpa`` plugin."""

    backend: Backend = Field(
        "auto", description="pin an SDPA kernel on CUDA (flash, efficient, cudnn, math); auto lets torch choose"
    )
    cpu_decode: Literal["kernel", "sdpa"] = Field(
        "kernel", description="one-query CPU calls without a mask (decode) with backend auto: 'kernel' = the "
        "SDK's decode attention (a warning and SDPA where it cannot build), 'sdpa' = torch's SDPA",
    )
    cuda_decode: Literal["kernel", "sdpa"] = Field(
        "kernel", description="one-query CUDA calls (decode) in fp16/bf16 with no mask or a (B, 1, 1, S) boolean one, "
        "with backend auto: 'kernel' = the SDK's split-key decode attention (a warning and SDPA without triton), "
        "'sdpa' = torch's SDPA",
    )


class SdpaAttention(AttentionMechanism):
    """Softmax attention through torch's fused SDPA kernels; see the module docstring."""

    Options = SdpaOptions
    options: SdpaOptions

    def __init__(self, options: SdpaOptions | None = None) -> None:
        super().__init__(options)
        self._pinned = None if self.options.backend == "auto" else self.options.backend
        self._cpu_kernel = self._pinned is None and self.options.cpu_decode == "kernel"
        self._cuda_kernel = self._pinned is None and self.options.cuda_decode == "kernel"

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        backend = self.options.backend
        reasons = []
        if backend in CUDA_ONLY and device != "cuda":
            reasons.append(
                f"sdpa backend {backend!r} is a CUDA kernel and cannot run on {device!r}; use backend 'auto' or 'math'"
            )
        if backend in HALF_ONLY and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"sdpa backend {backend!r} runs fp16/bf16 only, not {dtype}; use 'efficient' or 'auto'")
        return reasons

    @contextlib.contextmanager
    def _kernel(self) -> Iterator[None]:
        if self._pinned is None:
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[self._pinned]
        with sdpa_kernel(backend):
            yield

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        t, s = query.shape[2], key.shape[2]  # q (B, H, T, D), k/v (B, Hkv, S, D)
        h, hkv = query.shape[1], key.shape[1]
        attn_mask: torch.Tensor | None = mask  # (B, 1, T, S) bool or None
        is_causal = False
        if mask is None and t > 1:
            if t == s:
                is_causal = True
            else:  # chunked prefill: queries are the last T positions (lower-right causal)
                attn_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)  # (T, S)
        if self._cpu_kernel and mask is None and query.device.type == "cpu" \
                and not cpu_kernels.usable("sdpa", "torch's scaled_dot_product_attention for CPU decode"):
            self._cpu_kernel = False  # warned once. Asked at every unmasked CPU call, so a causal LM's eager
            # prefill loads the kernel before a compiled decode step is traced (a build inside a trace would
            # break the graph); encoders always pass a mask and never build it
        if t == 1 and mask is None and self._cpu_kernel and query.device.type == "cpu":
            b, d = query.shape[0], query.shape[3]
            grouped = query.reshape(b, hkv, h // hkv, d)  # (B, Hkv, G, D): head i reads key/value head i // G
            out = cpu_kernels.decode_attention(grouped, key, value, d ** -0.5 if scale is None else scale)
            return out.reshape(b, h, 1, d)  # (B, H, 1, D)
        # asked at every CUDA call, so an eager prefill imports it; without triton, warned once and SDPA from then on
        decode = _cuda_decode() if self._cuda_kernel and query.is_cuda else None
        if decode is None and self._cuda_kernel and query.is_cuda:
            self._cuda_kernel = False
        if t == 1 and decode is not None and query.dtype in (torch.float16, torch.bfloat16) \
                and query.shape[3] <= 256 and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4
                                                               and mask.shape[1] == mask.shape[2] == 1)):
            b, d = query.shape[0], query.shape[3]
            grouped = query.reshape(b, hkv, h // hkv, d)  # (B, Hkv, G, D): head i reads key/value head i // G
            out = decode(grouped, key, value, mask, d ** -0.5 if scale is None else scale)
            return out.reshape(b, h, 1, d)  # (B, H, 1, D)
        if t == 1 and h != hkv:
            # GQA decode as plain multi-head attention: the G = H / Hkv query heads that share a key/value
            # head become G query rows of that head. Same math as repeating key/value heads, without
            # reading or copying them G times, and every kernel (flash, efficient, cuDNN) accepts it.
            b, d = query.shape[0], query.shape[3]
            grouped = query.reshape(b, hkv, h // hkv, d)  # (B, Hkv, G, D): head i reads key/value head i // G
            out = self._sdpa(grouped, key, value, mask, False, scale, {}, prefill=False)  # (B, Hkv, G, D)
            return out.reshape(b, h, 1, d)  # (B, H, 1, D)
        extra = {}
        if h != hkv:
            if HAS_ENABLE_GQA and self._pinned != "efficient":  # the efficient kernel has no GQA
                extra["enable_gqa"] = True
            else:
                key = key.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
                value = value.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
        return self._sdpa(query, key, value, attn_mask, is_causal, scale, extra, prefill=t > 1)  # (B, H, T, D)

    def _sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
        is_causal: bool, scale: float | None, extra: dict[str, bool], prefill: bool,
    ) -> torch.Tensor:
        """One SDPA call; a pinned kernel that refuses the inputs is a one-line error, never a fallback."""
        if self._pinned is None:
            if prefill and query.is_cuda:
                # cuDNN's attention builds an execution plan per new shape, tens of milliseconds on
                # the host each time: a serving engine whose prompts all differ in length paid it on
                # nearly every prefill. torch's other kernels, in torch's own order, have no plan.
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(AUTO_PREFILL):
                    return F.scaled_dot_product_attention(
                        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra
                    )
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra
            )
        try:
            with self._kernel():
                return F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra
                )
        except RuntimeError as err:
            raise Dsr1Error(
                f"sdpa backend {self._pinned!r} cannot run this call ({query.dtype}, head dim {query.shape[-1]}, "
                f"{'a mask' if attn_mask is not None else 'no mask'}, on {query.device.type}): "
                f"{str(err).strip().splitlines()[0]}; use backend 'auto'"
            ) from err


@hookimpl
def dsr1_attention() -> PluginSpec:
    return PluginSpec(
        name="sdpa",
        family="attention",
        impl=SdpaAttention,
        options=SdpaOptions,
        capabilities=frozenset({"gqa", "mask", "fp16", "bf16"}),
        description="torch scaled_dot_product_attention (GQA, boolean masks, pinnable CUDA backend)",
    )

"""Builtin KV cache ``int8``: keys and values stored as int8 codes with one float32 scale
per token and head (symmetric absmax: ``scale = max|x| / 127``, ``x ≈ code * scale``, so the
round-trip error of an element is at most ``scale / 2``), dequantized for attention.

Composition, not a copy of the storage: the codes live in one inner cache and the scales in
another (with ``head_dim`` 1), both ``contiguous`` or both ``paged`` (``paged: true`` and a
``block_size``), so paging, block tables and allocation are the inner caches' own code.
Per token and head it stores ``D + 4`` bytes for K and as many for V (codes + a float32
scale), against ``4 D`` in fp32 (3.8x less at ``D = 64``) and ``2 D`` in fp16/bf16 (1.9x).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import CacheShape, KVCache
from dsr1.kvcache.contiguous import ContiguousKVCache, ContiguousOptions
from dsr1.kvcache.paged import PagedKVCache, PagedOptions, check_block_size
from dsr1.specs import PluginSpec

QMAX = 127


class Int8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: store codes and scales in paged blocks instead of contiguous buffers.
    paged: bool = False
    #: tokens per block when ``paged`` (a power of two).
    block_size: int = 16
    #: blocks per pool when ``paged`` (default: what the batch needs).
    num_blocks: int | None = Field(default=None, ge=1)
    #: token capacity rounding when contiguous.
    granularity: int = Field(default=256, ge=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        return check_block_size(value)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, Hkv, T, D)`` → int8 codes ``(B, Hkv, T, D)`` and float32 scales ``(B, Hkv, T, 1)``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)  # (B, Hkv, T, 1)
    codes = (xf / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``(B, Hkv, S, D)`` times scales ``(B, Hkv, S, 1)``, in ``dtype``."""
    return (codes.float() * scale).to(dtype)


class Int8KVCache(KVCache):
    """int8 K/V codes + per-token, per-head scales over two inner caches (contiguous or paged)."""

    Options = Int8Options
    options: Int8Options

    def __init__(self, options: Int8Options | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.codes: KVCache
        self.scales: KVCache
        if o.paged:
            paged = PagedOptions(block_size=o.block_size, num_blocks=o.num_blocks)
            self.codes, self.scales = PagedKVCache(paged), PagedKVCache(paged)
        else:
            contiguous = ContiguousOptions(granularity=o.granularity)
            self.codes, self.scales = ContiguousKVCache(contiguous), ContiguousKVCache(contiguous)
        self.dtype = torch.float32

    def allocate(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.codes.allocate(shape, torch.int8, device)
        self.scales.allocate(replace(shape, head_dim=1), torch.float32, device)
        self.dtype = dtype

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qk, sk = quantize(key)
        qv, sv = quantize(value)
        ck, cv = self.codes.update(layer, qk, qv, start)  # (B, Hkv, S, D) int8
        sk_all, sv_all = self.scales.update(layer, sk, sv, start)  # (B, Hkv, S, 1) float32
        return dequantize(ck, sk_all, self.dtype), dequantize(cv, sv_all, self.dtype)

    def nbytes(self) -> int:
        return self.codes.nbytes() + self.scales.nbytes()

    def reset(self) -> None:
        self.codes.reset()
        self.scales.reset()


@hookimpl
def dsr1_kvcache() -> PluginSpec:
    return PluginSpec(
        name="int8",
        family="kvcache",
        impl=Int8KVCache,
        options=Int8Options,
        capabilities=frozenset({"kv", "quantized"}),
        description="int8 K/V codes with per-token, per-head absmax scales; contiguous or paged (paged: true)",
    )

"""Builtin KV cache ``contiguous``: one preallocated ``(L, B, Hkv, Tmax, D)`` tensor for keys
and one for values. ``update`` writes in place and returns views; nothing is allocated per
token. A second ``allocate`` with the same shape, dtype and device reuses the buffers.
"""
from __future__ import annotations

import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import CacheShape, KVCache
from dsr1.specs import PluginSpec


class ContiguousKVCache(KVCache):
    """Static per-layer K/V storage for incremental decoding (gpt-fast style)."""

    def __init__(self, options: object | None = None) -> None:
        super().__init__(options)  # type: ignore[arg-type]
        self.k: torch.Tensor | None = None  # (L, B, Hkv, Tmax, D)
        self.v: torch.Tensor | None = None
        self.shape: CacheShape | None = None
        self.length = 0

    def allocate(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        dims = (shape.n_layers, shape.batch_size, shape.n_kv_heads, shape.max_len, shape.head_dim)
        k = self.k
        if k is None or tuple(k.shape) != dims or k.dtype != dtype or k.device != torch.device(device):
            self.k = self.v = None  # free the old buffers before taking new ones
            self.k = torch.zeros(dims, dtype=dtype, device=device)
            self.v = torch.zeros(dims, dtype=dtype, device=device)
        self.shape = shape
        self.length = 0

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None:
            raise RuntimeError("ContiguousKVCache.update before allocate")
        end = start + key.shape[2]
        k, v = self.k[layer], self.v[layer]  # (B, Hkv, Tmax, D)
        k[:, :, start:end].copy_(key)
        v[:, :, start:end].copy_(value)
        if layer == 0:
            self.length = end
        return k[:, :, :end], v[:, :, :end]  # (B, Hkv, S, D) views

    def nbytes(self) -> int:
        if self.k is None or self.v is None:
            return 0
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.length = 0


@hookimpl
def dsr1_kvcache() -> PluginSpec:
    return PluginSpec(
        name="contiguous",
        family="kvcache",
        impl=ContiguousKVCache,
        capabilities=frozenset({"preallocated", "kv"}),
        description="preallocated (L, B, Hkv, Tmax, D) key/value tensors, updated in place",
    )

"""The engine's paged KV pool and the attention context that reads and writes it.

Every layer owns one key pool and one value pool of ``(num_blocks, block_size, Hkv, D)``;
a request owns an ordered list of blocks (its block table, decided by the scheduler's
:class:`~dsr1.engine.blocks.BlockManager`), so token ``p`` of a request lives in slot
``block_table[p // block_size] * block_size + p % block_size`` of the flattened pool.

:class:`PagedStep` is built once per forward by the runner from plain per-row numbers
(block tables, starts, lengths); each attention layer hands it the step's new keys/values
and queries (:meth:`PagedStep.attend`). It writes the new tokens into their slots, then
attends over each row's context through its block table:

* the reference path (any device) gathers the row's blocks into ``(B, Hkv, S, D)`` and calls
  the model's attention plugin with a mask that folds causality, each row's length and the
  sliding window: slow, but it is the oracle the kernels are tested against;
* a decode kernel (``decode_kernel``, one query per row) reads the blocks in place: no
  gather. The CUDA one lives in :mod:`dsr1.engine.paged_triton`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dsr1.interfaces import AttentionContext

#: ``(q (B, H, D), k_pool, v_pool, block_tables (B, NB) int32, context_lens (B,) int32, scale, window)``
#: → ``(B, H, D)``: attention of one query per row over its first ``context_lens`` tokens.
DecodeKernel = Callable[..., torch.Tensor]


class PagedKV:
    """Key and value pools of every layer: ``(num_blocks, block_size, Hkv, D)`` each.

    ``shared``: keys and values are the same vectors (multi-head latent attention caches one
    latent per token that serves as both), so ``v`` is ``k`` and the pool holds one copy."""

    def __init__(
        self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, shared: bool = False,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        # zeros, not empty: a masked slot's value still meets a zero weight, and 0 * NaN garbage is NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = self.k if shared else [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.shared = shared

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        shared: bool = False) -> int:
        pools = 1 if shared else 2
        return pools * n_layers * block_size * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k if self.shared else (*self.k, *self.v)))


class PagedStep(AttentionContext):
    """One forward of ``B`` rows of ``T`` tokens (left-padded) against the paged pool.

    :param tables: each row's block table (plain lists, padded here).
    :param starts: position of each row's first new token (tokens before it are cached).
    :param lens: new tokens per row (``<= T``; the row's tokens are its last ``lens`` columns).
    """

    def __init__(
        self, kv: PagedKV, tables: Sequence[Sequence[int]], starts: Sequence[int], lens: Sequence[int], t: int,
        window: int | None, device: torch.device, decode_kernel: DecodeKernel | None = None,
    ) -> None:
        self.kv, self.window = kv, window
        bs = kv.block_size
        b = len(tables)
        nb = max(len(row) for row in tables)
        table = torch.zeros((b, nb), dtype=torch.long)  # (B, NB); padding blocks are never read unmasked
        for i, row in enumerate(tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        start = torch.tensor(starts, dtype=torch.long)  # (B,)
        n = torch.tensor(lens, dtype=torch.long)  # (B,)
        col = torch.arange(t)  # (T,)
        offset = col[None, :] - (t - n)[:, None]  # (B, T): index of the token in this row's new tokens
        real = offset >= 0  # (B, T): False at left padding
        pos = start[:, None] + offset.clamp_min(0)  # (B, T); padding sits at the row's first new position
        self.positions = pos.to(device)
        slot = table.gather(1, pos // bs) * bs + pos % bs  # (B, T)
        self.slots = slot[real].to(device)  # (N,) flat slots of the real tokens
        self.real = real.to(device)  # (B, T)
        self.context_lens = (start + n).to(device)  # (B,)
        self.table = table.to(device)
        self.decode_kernel = decode_kernel if t == 1 else None
        if self.decode_kernel is None:
            keys = torch.arange(nb * bs)  # (S,)
            seen = (keys[None, None, :] <= pos[:, :, None])  # (B, T, S): causal; rows end at their context
            self.mask = seen[:, None].to(device)  # (B, 1, T, S)
            self.window_mask = None
            if window is not None:
                self.window_mask = (seen & (keys[None, None, :] > pos[:, :, None] - window))[:, None].to(device)
        else:
            self.table32 = self.table.to(torch.int32)
            self.lens32 = self.context_lens.to(torch.int32)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, scale: float,
        windowed: bool,
    ) -> torch.Tensor:
        """Write ``k``/``v`` ``(B, Hkv, T, D)`` into their slots; attention output ``(B, H, T, D)``."""
        kv = self.kv
        k_pool = kv.k[layer].view(-1, kv.n_kv_heads, kv.head_dim)  # (NB_all * bs, Hkv, D)
        v_pool = kv.v[layer].view(-1, kv.n_kv_heads, kv.head_dim)
        k_pool.index_copy_(0, self.slots, k.transpose(1, 2)[self.real])  # (N, Hkv, D) rows of real tokens
        if not kv.shared:
            v_pool.index_copy_(0, self.slots, v.transpose(1, 2)[self.real])
        window = self.window if windowed else None
        if self.decode_kernel is not None:
            o = self.decode_kernel(q[:, :, 0], kv.k[layer], kv.v[layer], self.table32, self.lens32, scale, window)
            return o[:, :, None]  # (B, H, 1, D)
        b = q.shape[0]
        keys = kv.k[layer][self.table].view(b, -1, kv.n_kv_heads, kv.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        values = kv.v[layer][self.table].view(b, -1, kv.n_kv_heads, kv.head_dim).transpose(1, 2)
        mask = self.window_mask if window is not None else self.mask
        return attn(q, keys, values, mask, scale)  # (B, H, T, D)


def decode_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float, window: int | None,
) -> torch.Tensor:
    """Slow oracle of a :data:`DecodeKernel`, one row at a time in fp32: ``(B, H, D)``."""
    b, h, d = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    for i in range(b):
        n = int(lens[i])
        blocks = tables[i, : -(-n // bs)].long()
        keys = k_pool[blocks].reshape(-1, hkv, d)[:n].float()  # (n, Hkv, D)
        values = v_pool[blocks].reshape(-1, hkv, d)[:n].float()
        lo = max(0, n - window) if window is not None else 0
        keys, values = keys[lo:], values[lo:]
        qi = q[i].float().view(hkv, h // hkv, d)  # (Hkv, G, D): query heads grouped by their KV head
        scores = torch.einsum("kgd,nkd->kgn", qi, keys) * scale  # (Hkv, G, n)
        o = torch.einsum("kgn,nkd->kgd", scores.softmax(-1), values)  # (Hkv, G, D)
        out[i] = o.reshape(h, d).to(q.dtype)
    return out

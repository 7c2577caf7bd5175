"""Packed prefill: a step's prompt chunks run as one row of ``N`` tokens, without padding.

Left-padding chunks of different lengths to the longest one (what :class:`~dsr1.engine.paged.PagedStep`
does, the reference) makes every linear layer pay for the padding; with prompts of 64 to
1,024 tokens that is about half of the prefill's matmul work. Here the chunks are concatenated
(``cu`` offsets, as flash-attention's varlen API), so the projections and MLPs see exactly the
step's tokens, and only attention is per chunk:

* a chunk that starts the request (nothing cached) attends to its own keys, causally: the
  attention plugin's ``mask=None`` with ``T == S`` (flash's causal path on CUDA);
* a chunk after cached tokens (a previous chunk, or a prefix-cache hit) reads its row's blocks
  from the pool up to its end, lower-right causal (the plugin's ``1 < T < S`` case);
* a sliding-window layer gets an explicit ``(1, 1, T, S)`` mask.

Every chunk's new keys and values go to their pool slots first, in one ``index_copy_``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsr1.engine.paged import PagedKV
from dsr1.interfaces import AttentionContext


@dataclass
class _Chunk:
    offset: int  # first token of the chunk in the packed row
    n: int  # new tokens
    start: int  # tokens of the request already cached
    blocks: torch.Tensor | None  # (NB,) the row's blocks up to the chunk's end; None when nothing is cached
    window_mask: torch.Tensor | None  # (1, 1, n, start + n)


class PackedPrefill(AttentionContext):
    """Prefill chunks packed into one row: ``positions`` ``(1, N)``, ``last`` ``(R,)`` (the index of each
    chunk's last token, whose hidden state is the one that samples)."""

    def __init__(
        self, kv: PagedKV, tables: Sequence[Sequence[int]], starts: Sequence[int], lens: Sequence[int],
        window: int | None, device: torch.device,
    ) -> None:
        self.kv, self.window = kv, window
        bs = kv.block_size
        positions, slots, self.chunks = [], [], []
        offset = 0
        for table, start, n in zip(tables, starts, lens):
            pos = torch.arange(start, start + n)  # (n,)
            row = torch.tensor(table[: -(-(start + n) // bs)], dtype=torch.long)  # (NB,)
            positions.append(pos)
            slots.append(row[pos // bs] * bs + pos % bs)
            wmask = None
            if window is not None:
                keys = torch.arange(start + n)  # (S,)
                wmask = ((keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window))[None, None]
                wmask = wmask.to(device)
            self.chunks.append(_Chunk(offset, n, start, row.to(device) if start else None, wmask))
            offset += n
        self.positions = torch.cat(positions)[None].to(device)  # (1, N)
        self.slots = torch.cat(slots).to(device)  # (N,)
        self.last = torch.tensor([c.offset + c.n - 1 for c in self.chunks], device=device)  # (R,)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, scale: float,
        windowed: bool,
    ) -> torch.Tensor:
        """``q`` ``(1, H, N, D)``, ``k``/``v`` ``(1, Hkv, N, D)`` → attention output ``(1, H, N, D)``."""
        kv = self.kv
        hkv, d = kv.n_kv_heads, kv.head_dim
        kv.k[layer].view(-1, hkv, d).index_copy_(0, self.slots, k[0].transpose(0, 1))  # (N, Hkv, D)
        kv.v[layer].view(-1, hkv, d).index_copy_(0, self.slots, v[0].transpose(0, 1))
        outs = []
        for c in self.chunks:
            a, b = c.offset, c.offset + c.n
            if c.blocks is None:
                keys, values = k[:, :, a:b], v[:, :, a:b]  # (1, Hkv, n, D)
            else:
                ctx = c.start + c.n
                keys = kv.k[layer][c.blocks].view(1, -1, hkv, d)[:, :ctx].transpose(1, 2)  # (1, Hkv, ctx, D)
                values = kv.v[layer][c.blocks].view(1, -1, hkv, d)[:, :ctx].transpose(1, 2)
            mask = c.window_mask if windowed else None
            outs.append(attn(q[:, :, a:b], keys, values, mask, scale))  # (1, H, n, D)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, H, N, D)

"""Paged decode attention on CUDA: one Triton kernel reading K/V through the block table.

Flash-decoding's split of the context: a program per (row, KV head, split) walks its share
of the row's blocks with an online softmax and writes a partial result; a small reduction in
torch merges the splits. The program handles every query head of its KV head's group at once
(GQA), so each key and value block is read from memory once per group, not once per query
head. Its oracle is :func:`dsr1.engine.paged.decode_reference`.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

#: the kernel's matmuls need at least 16 rows (query heads of a group, padded) and 16 keys.
MIN_DOT = 16
#: keys per loop iteration: several blocks' loads in flight hide the pool's latency.
TILE_TOKENS = 64


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_split(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr,
        scale, window, max_blocks,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, TILE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kh = tl.program_id(1)
        s = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        t = tl.arange(0, TILE)  # a tile spans TILE // BS blocks: several block loads in flight at once
        n = tl.load(lens_ptr + b)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(n - window, 0)
        # q: (B, H, D) with H = HKV * G; this program's heads are kh*G .. kh*G+G-1
        q = tl.load(q_ptr + ((b * HKV + kh) * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        # the row's own tiles are split evenly, so fixed launch shapes (a captured graph) still
        # share a short row's work between its programs
        n_tiles = tl.cdiv(n, TILE)
        per_split = tl.cdiv(n_tiles, SPLITS)
        first = s * per_split
        last = tl.minimum(first + per_split, n_tiles)
        for tile in range(first, last):
            pos = tile * TILE + t  # (TILE,) token positions
            valid = (pos < n) & (pos >= lo)
            block = tl.load(table_ptr + b * max_blocks + pos // BS, mask=pos < n, other=0).to(tl.int64)  # (TILE,)
            offs = ((block[:, None] * BS + (pos % BS)[:, None]) * HKV + kh) * D + d[None, :]  # pool (NB, BS, HKV, D)
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)  # (TILE, D)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (BLOCK_G, TILE)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile wholly outside the window
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m = m_new
        base = (b * HKV + kh) * SPLITS + s
        tl.store(acc_ptr + (base * BLOCK_G + g[:, None]) * D + d[None, :], acc)
        tl.store(m_ptr + base * BLOCK_G + g, m)
        tl.store(l_ptr + base * BLOCK_G + g, l_sum)

    return paged_decode_split


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (asked once per device)."""
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def splits_for(max_tiles: int, rows_times_heads: int, sms: int) -> int:
    """One split per (row, KV head) unless those leave most of the GPU idle on long rows.

    On the H200 (``bench/results/engine/paged-tune-h200.json``) one split won at every batch
    from 1 to 256 rows up to 4k tokens: merging splits costs more than the parallelism it buys.
    Splitting pays only when a few rows decode very long contexts."""
    if rows_times_heads * 4 >= sms or max_tiles < 256:
        return 1
    return max(1, min(sms // rows_times_heads, max_tiles // 64, 64))


def paged_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float, window: int | None, splits: int | None = None, tile: int = TILE_TOKENS,
    num_warps: int | None = 8, num_stages: int | None = 2,
) -> torch.Tensor:
    """Attention of ``q`` ``(B, H, D)`` over each row's first ``lens[b]`` pooled tokens: ``(B, H, D)``.

    ``k_pool``/``v_pool`` ``(NB, BS, Hkv, D)``; ``tables`` ``(B, max_blocks)`` int32; ``lens`` ``(B,)`` int32.
    ``splits``/``tile``/``num_warps``/``num_stages``: launch settings (defaults: the H200's best).
    """
    b, h, d = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    if d & (d - 1) or bs < MIN_DOT or bs & (bs - 1):
        raise ValueError(f"paged_decode needs a power-of-two head dim and block size >= {MIN_DOT}, got {d}, {bs}")
    g = h // hkv
    block_g = max(MIN_DOT, 1 << (g - 1).bit_length())
    max_blocks = tables.shape[1]
    tile = max(bs, tile)
    splits = splits or splits_for(max_blocks * bs // tile, b * hkv, multiprocessors(q.device))
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    acc = torch.empty((b, hkv, splits, block_g, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b, hkv, splits, block_g), dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    _kernel()[(b, hkv, splits)](
        q.contiguous(), k_pool, v_pool, tables, lens, acc, m, l_sum, float(scale), int(window or 0), max_blocks,
        HKV=hkv, G=g, BLOCK_G=block_g, D=d, BS=bs, SPLITS=splits, HAS_WINDOW=window is not None,
        TILE=tile, **launch,
    )
    if splits == 1:
        out = acc[:, :, 0] / l_sum[:, :, 0, :, None]  # (B, Hkv, BLOCK_G, D)
        return out[:, :, :g].reshape(b, h, d).to(q.dtype)
    top = m.amax(dim=2, keepdim=True)  # (B, Hkv, 1, BLOCK_G)
    w = torch.exp(m - top).nan_to_num_(0.0)  # (B, Hkv, SPLITS, BLOCK_G); empty splits weigh 0
    out = (acc * w[..., None]).sum(2) / (l_sum * w).sum(2)[..., None]  # (B, Hkv, BLOCK_G, D)
    return out[:, :, :g].reshape(b, h, d).to(q.dtype)


@torch.library.custom_op("dsr1::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    return paged_decode(q, k_pool, v_pool, tables, lens, scale, window or None)


@_paged_decode_op.register_fake
def _(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
      scale: float, window: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, D)


def paged_decode_opaque(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float, window: int | None,
) -> torch.Tensor:
    """:func:`paged_decode` as one opaque custom op, for code that ``torch.compile`` traces: inductor
    would otherwise trace into the Triton launch and fail to compile the kernel's source again."""
    return _paged_decode_op(q, k_pool, v_pool, tables, lens, float(scale), int(window or 0))


#: what a compiled step calls instead (:mod:`dsr1.engine.paged_graph` looks for this attribute)
paged_decode.opaque = paged_decode_opaque  # type: ignore[attr-defined]

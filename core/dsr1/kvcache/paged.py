"""Builtin KV cache ``paged``: fixed-size blocks from a per-layer pool, a block table per
sequence and a free list (vLLM's PagedAttention layout, without the paged kernel).

Storage is one pool per layer, ``(L, N, Hkv, block_size, D)`` for keys and one for values.
:class:`BlockAllocator` hands blocks to sequences as they grow and takes them back when
they finish; it is plain Python (no tensors) so a scheduler can drive it directly, and it is
what dynamic batching will build on. :class:`PagedKVCache` keeps the ``(B, max_blocks)``
block table on the device, writes new tokens into their blocks and, for attention, returns
the sequence's blocks gathered into a contiguous ``(B, Hkv, S, D)`` tensor (one copy per
layer and step: the price of not having a paged attention kernel).

``num_blocks`` defaults to what the batch needs at ``max_len`` (``B * ceil(max_len / bs)``);
a smaller pool fails at ``allocate`` with the capacity and the option to raise.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import CacheShape, KVCache
from dsr1.specs import PluginSpec


def check_block_size(value: int) -> int:
    """Pydantic validator body: block sizes are powers of two (offsets by shift and mask)."""
    if value < 1 or value & (value - 1):
        lower = 1 << max(value.bit_length() - 1, 0)
        raise ValueError(f"block_size must be a power of two, e.g. {lower} or {lower * 2}")
    return value


class PagedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: tokens per block; a power of two.
    block_size: int = 16
    #: blocks in each layer's pool; default: what the batch needs at its maximum length.
    num_blocks: int | None = Field(default=None, ge=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        return check_block_size(value)


class BlockAllocator:
    """Free-list block allocator: sequences own ordered lists of block ids (their block tables).

    Invariants (checked by :meth:`check`): every block is either free or owned by exactly one
    sequence, so ``num_used + num_free == num_blocks``; a sequence of ``n`` tokens owns
    ``ceil(n / block_size)`` blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, order: Sequence[int] | None = None) -> None:
        check_block_size(block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        order = list(range(num_blocks)) if order is None else list(order)
        if sorted(order) != list(range(num_blocks)):
            raise Dsr1Error(f"block order must be a permutation of range({num_blocks})")
        self._free: list[int] = order[::-1]  # pop() hands out order[0] first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def reorder_free(self, order: Sequence[int]) -> None:
        """Hand out the free blocks in ``order`` (a permutation of the free ids; tests use it)."""
        if sorted(order) != sorted(self._free):
            raise Dsr1Error("reorder_free needs a permutation of the free block ids")
        self._free = list(order)[::-1]

    def add_sequence(self, seq: int) -> None:
        if seq in self.tables:
            raise Dsr1Error(f"sequence {seq} is already in the paged kvcache")
        self.tables[seq], self.lengths[seq] = [], 0

    def append(self, seq: int, n_tokens: int) -> list[int]:
        """Grow ``seq`` by ``n_tokens``; returns the blocks newly given to it (all or none)."""
        if seq not in self.tables:
            raise Dsr1Error(f"sequence {seq} is not in the paged kvcache (add_sequence first)")
        table = self.tables[seq]
        need = -(-(self.lengths[seq] + n_tokens) // self.block_size) - len(table)
        if need > len(self._free):
            raise Dsr1Error(
                f"paged kvcache is out of blocks: sequence {seq} needs {need} more block(s) of {self.block_size} "
                f"tokens but {len(self._free)} of num_blocks={self.num_blocks} are free (capacity "
                f"{self.num_blocks * self.block_size} tokens); raise kvcache.options.num_blocks or shorten the context"
            )
        new = [self._free.pop() for _ in range(max(need, 0))]
        table.extend(new)
        self.lengths[seq] += n_tokens
        return new

    def free_sequence(self, seq: int) -> None:
        """Return the blocks of a finished sequence to the free list."""
        if seq not in self.tables:
            raise Dsr1Error(f"sequence {seq} is not in the paged kvcache (finished twice, or never added)")
        self._free.extend(reversed(self.tables.pop(seq)))
        del self.lengths[seq]

    def check(self) -> None:
        """Assert the invariants (cheap enough for tests, not for the decode loop)."""
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) + len(self._free) == self.num_blocks, "used + free != total"
        assert sorted(owned + self._free) == list(range(self.num_blocks)), "a block is lost or owned twice"
        for seq, table in self.tables.items():
            assert len(table) == -(-self.lengths[seq] // self.block_size), f"sequence {seq} owns the wrong count"


class PagedKVCache(KVCache):
    """Block-pool K/V storage; ``update`` returns contiguous gathered views for attention."""

    Options = PagedOptions
    options: PagedOptions

    def __init__(self, options: PagedOptions | None = None) -> None:
        super().__init__(options)
        self.k: torch.Tensor | None = None  # (L, N, Hkv, bs, D)
        self.v: torch.Tensor | None = None
        self.table: torch.Tensor | None = None  # (B, max_blocks) block ids, on the device
        self.allocator = BlockAllocator(1, self.options.block_size)
        self.seqs: list[int] = []  # allocator sequence id of each batch row
        self.length = 0  # tokens reserved for every row

    def allocate(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        bs = self.options.block_size
        per_seq = max(-(-shape.max_len // bs), 1)
        need = shape.batch_size * per_seq
        n = self.options.num_blocks or need
        if need > n:
            raise Dsr1Error(
                f"paged kvcache: {shape.batch_size} sequence(s) of up to {shape.max_len} tokens need {need} blocks "
                f"of {bs}, but num_blocks={n} holds {n * bs} tokens; raise kvcache.options.num_blocks to {need}"
            )
        dims = (shape.n_layers, n, shape.n_kv_heads, bs, shape.head_dim)
        k = self.k
        if k is None or k.shape != dims or k.dtype != dtype or k.device != torch.device(device):
            self.k = self.v = None  # free the old pools first
            self.k = torch.zeros(dims, dtype=dtype, device=device)
            self.v = torch.zeros(dims, dtype=dtype, device=device)
        self.table = torch.zeros((shape.batch_size, per_seq), dtype=torch.long, device=device)
        self.allocator = BlockAllocator(n, bs)
        self.seqs = list(range(shape.batch_size))
        for seq in self.seqs:
            self.allocator.add_sequence(seq)
        self.length = 0

    def _grow(self, end: int) -> None:
        assert self.table is not None
        if end > self.table.shape[1] * self.options.block_size:
            raise Dsr1Error(f"paged kvcache: position {end} is past the allocated max_len; allocate a longer shape")
        for row, seq in enumerate(self.seqs):
            have = len(self.allocator.tables[seq])
            new = self.allocator.append(seq, end - self.length)
            if new:
                self.table[row, have : have + len(new)] = torch.tensor(new, dtype=torch.long)
        self.length = end

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None or self.table is None:
            raise RuntimeError("PagedKVCache.update before allocate")
        b, hkv, t, d = key.shape
        bs = self.options.block_size
        end = start + t
        if end > self.length:
            self._grow(end)
        p = torch.arange(start, end, device=key.device)  # (T,) absolute slots
        blocks = self.table[:, p // bs]  # (B, T) physical block of each slot
        offsets = (p % bs).expand(b, t)  # (B, T)
        kp, vp = self.k[layer], self.v[layer]  # (N, Hkv, bs, D)
        kp[blocks, :, offsets] = key.transpose(1, 2).to(kp.dtype)  # (B, T, Hkv, D) into (N, Hkv, bs, D)
        vp[blocks, :, offsets] = value.transpose(1, 2).to(vp.dtype)
        nb = -(-end // bs)
        used = self.table[:, :nb]  # (B, nb)
        k = kp[used].transpose(1, 2).reshape(b, hkv, nb * bs, d)[:, :, :end]  # (B, Hkv, S, D) gathered
        v = vp[used].transpose(1, 2).reshape(b, hkv, nb * bs, d)[:, :, :end]
        return k, v

    def nbytes(self) -> int:
        if self.k is None or self.v is None or self.table is None:
            return 0
        return self.k.nbytes + self.v.nbytes + self.table.nbytes

    def reset(self) -> None:
        """Free every sequence's blocks and start the rows again at length 0."""
        for seq in self.seqs:
            self.allocator.free_sequence(seq)
            self.allocator.add_sequence(seq)
        self.length = 0


@hookimpl
def dsr1_kvcache() -> PluginSpec:
    return PluginSpec(
        name="paged",
        family="kvcache",
        impl=PagedKVCache,
        options=PagedOptions,
        capabilities=frozenset({"kv", "paged"}),
        description="fixed-size blocks from a per-layer pool with block tables and a free-list allocator",
    )

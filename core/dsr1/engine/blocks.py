"""KV block accounting with prefix caching: which block holds which tokens (no tensors).

The pool has ``num_blocks`` blocks of ``block_size`` token slots. Each block is in exactly
one of three states:

* **free**: on the free list, holds nothing anyone can reuse;
* **referenced**: in the block table of one or more live requests (``refcount`` = how many);
* **evictable**: held by nobody, but its content is still registered in the prefix cache,
  so a later request with the same prefix can take it back; it is reused for new content
  only when the free list is empty, least recently freed first.

A FULL block is registered in the prefix cache under the hash of (its parent block's hash,
its tokens), so a hash names the whole prefix up to the end of the block. Hashes are
SHA-256 digests rather than Python's ``hash()``: a collision would hand one request another
request's keys and values (vLLM's CVE-2025-25183 was exactly that, with ``hash()``).

With a host swap space (:class:`~dsr1.engine.swap.SwapSpace`, when the pool's ``kv_swap`` gives
one), :meth:`BlockManager.preempt` may send a request's computed blocks to host memory instead of
dropping them; :meth:`BlockManager.allocate` brings them back when the request is admitted again.
The copies themselves are queued for the next plan (:meth:`BlockManager.take_swaps`).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from dsr1.engine.request import Request
from dsr1.errors import Dsr1Error

if TYPE_CHECKING:
    from dsr1.engine.swap_space import SwapMoves, SwapSpace

_ROOT = b""  # parent hash of a request's first block


def block_hash(parent: bytes, tokens: Iterable[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of its parent's key and its token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Reference-counted KV blocks with an LRU prefix cache; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 swap: SwapSpace | None = None) -> None:
        if num_blocks < 1:
            raise Dsr1Error(f"the KV pool needs at least 1 block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise Dsr1Error(f"a KV block holds at least 1 token, got block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        #: host swap blocks for preempted requests (None: a preempted request is recomputed)
        self.swap = swap
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._refcount = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks  # registered prefix-cache key per block
        self._cached: dict[bytes, int] = {}  # prefix-cache key -> block
        self._owners: dict[str, Request] = {}  # requests holding blocks, by id
        self._chain: dict[str, list[bytes]] = {}  # per request: keys of its leading full computed blocks
        self._prefix_hits = 0
        self._prefix_queries = 0

    # --- queries ---------------------------------------------------------------------------

    def num_free(self) -> int:
        """Blocks a new allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def stats(self) -> dict[str, Any]:
        """Prefix-cache counters in tokens since construction, and blocks in use now."""
        queries = self._prefix_queries
        return {
            "prefix_hits": self._prefix_hits,
            "prefix_queries": queries,
            "prefix_hit_rate": self._prefix_hits / queries if queries else None,
            "usage": self.num_blocks - self.num_free(),
        }

    def _match(self, token_ids: Sequence[int]) -> list[tuple[bytes, int]]:
        """(key, block) of the cached leading full blocks of ``token_ids``, at most all but one token."""
        if not self.prefix_caching:
            return []
        found: list[tuple[bytes, int]] = []
        parent = _ROOT
        bs = self.block_size
        # Leave at least one token to compute: a step needs a fed token to produce logits.
        for i in range((len(token_ids) - 1) // bs):
            key = block_hash(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._cached.get(key)
            if block is None:
                break
            found.append((key, block))
            parent = key
        return found

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached full blocks that hold ``token_ids``' leading full blocks (never all of it). Read-only."""
        return [block for _, block in self._match(token_ids)]

    def cached_tokens(self, request: Request) -> int:
        """Leading tokens of a request without blocks that admitting it does not compute: its cached
        prefix, or the tokens it swapped out (whichever is longer). Read-only."""
        return max(len(self._match(request.all_ids)) * self.block_size, request.num_swapped_tokens)

    def capacity(self, request: Request) -> int:
        """The most tokens :meth:`allocate` could make ``request``'s table cover right now."""
        if request.block_ids:
            return (len(request.block_ids) + self.num_free()) * self.block_size
        matched = [b for _, b in self._match(request.all_ids)]
        revived = sum(1 for b in matched if b in self._evictable)
        return (len(matched) + self.num_free() - revived) * self.block_size

    # --- changes ---------------------------------------------------------------------------

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Make ``request.block_ids`` cover its first ``num_tokens`` tokens; False (and no change) if the pool
        cannot. A request without blocks first takes its cached prefix (``num_computed_tokens`` jumps to it);
        a swapped one also gets its host blocks back past that prefix (:meth:`cached_tokens`)."""
        fresh_start = not request.block_ids
        matched = self._match(request.all_ids) if fresh_start else []
        have = len(request.block_ids) + len(matched)
        swapped = request.num_swapped_tokens if fresh_start and request.swapped else 0
        fresh = max(0, self.blocks_needed(max(num_tokens, swapped)) - have)
        revived = sum(1 for _, b in matched if b in self._evictable)
        if fresh > self.num_free() - revived:
            return False
        if fresh_start:
            self._prefix_queries += request.num_tokens if self.prefix_caching else 0
            self._prefix_hits += len(matched) * self.block_size
            for _, block in matched:
                if self._refcount[block] == 0:
                    del self._evictable[block]
                self._refcount[block] += 1
                request.block_ids.append(block)
            request.num_computed_tokens = len(matched) * self.block_size
        for _ in range(fresh):
            block = self._take()
            self._refcount[block] = 1
            request.block_ids.append(block)
        if swapped:
            assert self.swap is not None, f"request {request.request_id!r} is swapped out but there is no swap space"
            first, end = len(matched), self.blocks_needed(swapped)
            self.swap.swap_in(request, first, request.block_ids[first:end])  # the prefix hit needs no copy
            request.num_computed_tokens = max(request.num_computed_tokens, swapped)
        if request.block_ids:
            self._owners[request.request_id] = request
            if fresh_start:
                self._chain[request.request_id] = [key for key, _ in matched]
        return True

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)  # the least recently freed cached block
        key = self._hash_of[block]
        assert key is not None, f"evictable block {block} has no prefix-cache key"
        del self._cached[key]
        self._hash_of[block] = None
        return block

    def commit(self, request: Request) -> None:
        """Register every newly full computed block of ``request`` in the prefix cache."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = min(request.num_computed_tokens // bs, len(request.block_ids))
        chain = self._chain.get(request.request_id, [])
        if full <= len(chain):
            return
        self._chain[request.request_id] = chain
        parent = chain[-1] if chain else _ROOT
        for i in range(len(chain), full):
            key = block_hash(parent, request.slice_ids(i * bs, (i + 1) * bs))
            chain.append(key)
            parent = key
            block = request.block_ids[i]
            # Two requests may compute the same content at once: the first block stays the cached
            # one, the duplicate stays unregistered and returns to the free list when released.
            if key not in self._cached and self._hash_of[block] is None:
                self._cached[key] = block
                self._hash_of[block] = key

    def preempt(self, request: Request) -> bool:
        """Release a preempted request's blocks: True when the swap space took its computed KV (it
        resumes where it stopped), False when it will be recomputed."""
        computed = request.block_ids[: self.blocks_needed(request.num_computed_tokens)]
        swapped = self.swap is not None and self.swap.swap_out(request, computed)
        self._release(request)
        return swapped

    def take_swaps(self) -> SwapMoves:
        """The swap copies queued since the last call, for the plan being built (see :mod:`dsr1.engine.swap`)."""
        return self.swap.take() if self.swap is not None else ((), (), ())

    def free(self, request: Request) -> None:
        """Release ``request``'s blocks, on the device and, if it is swapped out, on the host."""
        self._release(request)
        if request.swapped:
            assert self.swap is not None, f"request {request.request_id!r} is swapped out but there is no swap space"
            self.swap.release(request)

    def _release(self, request: Request) -> None:
        """Give back the device blocks (last first, so a prefix's tail is evicted before its head)."""
        for block in reversed(request.block_ids):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        request.block_ids.clear()
        request.num_computed_tokens = 0
        self._owners.pop(request.request_id, None)
        self._chain.pop(request.request_id, None)

    # --- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError unless every block is free, evictable, or referenced exactly by its holders."""
        holders = [0] * self.num_blocks
        for rid, request in self._owners.items():
            table = request.block_ids
            if len(set(table)) != len(table):
                raise AssertionError(f"request {rid!r} holds a block twice: {table}")
            if not table:
                raise AssertionError(f"request {rid!r} lost its block table without free(): blocks leaked")
            for block in table:
                if not 0 <= block < self.num_blocks:
                    raise AssertionError(f"request {rid!r} holds block {block}, outside the pool of {self.num_blocks}")
                holders[block] += 1
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block in range(self.num_blocks):
            ref, where = self._refcount[block], (block in free) + (block in evictable)
            if ref != holders[block]:
                raise AssertionError(f"block {block}: refcount {ref} but {holders[block]} live requests hold it")
            if ref > 0 and where:
                raise AssertionError(f"block {block} is referenced ({ref}) and also free or evictable")
            if ref == 0 and where != 1:
                raise AssertionError(f"block {block} is held by nobody and is not exactly one of free/evictable")
            key = self._hash_of[block]
            if key is not None and self._cached.get(key) != block:
                raise AssertionError(f"block {block}'s prefix-cache key does not map back to it")
            if block in evictable and key is None:
                raise AssertionError(f"evictable block {block} has no prefix-cache key")
            if block in free and key is not None:
                raise AssertionError(f"free block {block} still has a prefix-cache key")
        if not set(self._chain) <= set(self._owners):
            raise AssertionError("a prefix-cache chain outlived its request's blocks")
        if len(self._cached) != sum(k is not None for k in self._hash_of):
            raise AssertionError("the prefix cache maps a key to a block that does not carry it")
        used = sum(1 for r in self._refcount if r > 0)
        if used + self.num_free() != self.num_blocks:
            raise AssertionError(f"used {used} + free {self.num_free()} != total {self.num_blocks}")
        if self.swap is not None:
            self.swap.check()


__all__ = ["BlockManager", "block_hash"]

"""BlockManager: KV block accounting with a prefix cache (plain data, exact invariants)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsr1.engine.blocks import BlockManager, block_hash
from dsr1.engine.request import Request, RequestStatus
from dsr1.errors import Dsr1Error


def computed(blocks: BlockManager, request: Request, n: int | None = None) -> None:
    """Pretend a step computed ``request``'s tokens up to ``n`` (default: all) and commit them."""
    request.num_computed_tokens = request.num_tokens if n is None else n
    blocks.commit(request)


def test_request_status_and_ids() -> None:
    r = Request("a", [1, 2, 3], 4, output_ids=[7, 8])
    assert r.all_ids == [1, 2, 3, 7, 8] and r.num_tokens == 5
    assert [r.slice_ids(s, e) for s, e in ((0, 2), (1, 4), (3, 5), (4, 5), (2, 2))] == [
        [1, 2], [2, 3, 7], [7, 8], [8], []]
    assert not RequestStatus.WAITING.finished and not RequestStatus.RUNNING.finished
    assert all(RequestStatus(v).finished for v in ("stop", "length", "abort"))


def test_bad_pool_is_one_line_error() -> None:
    with pytest.raises(Dsr1Error, match="num_blocks=0"):
        BlockManager(0, 16)
    with pytest.raises(Dsr1Error, match="block_size=0"):
        BlockManager(4, 0)


def test_blocks_needed_rounds_up() -> None:
    b = BlockManager(8, 4)
    assert [b.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_is_all_or_nothing() -> None:
    b = BlockManager(4, 4)
    r1, r2 = Request("r1", list(range(12)), 4), Request("r2", list(range(50, 58)), 4)
    assert b.allocate(r1, 12) and len(r1.block_ids) == 3 and b.num_free() == 1
    assert not b.allocate(r2, 8)
    assert r2.block_ids == [] and r2.num_computed_tokens == 0 and b.num_free() == 1
    assert not b.allocate(r1, 17)  # one more block fits, two do not
    assert len(r1.block_ids) == 3 and b.num_free() == 1
    assert b.allocate(r1, 16) and b.num_free() == 0
    b.check()


def test_prefix_is_shared_by_reference() -> None:
    b = BlockManager(8, 4)
    r1 = Request("r1", list(range(10)), 4)
    assert b.allocate(r1, 10)
    computed(b, r1)  # 2 full blocks registered, the third is partial
    r2 = Request("r2", [*range(8), 99, 98, 97], 4)
    assert b.match_prefix(r2.all_ids) == r1.block_ids[:2]
    assert b.allocate(r2, r2.num_tokens)
    assert r2.block_ids[:2] == r1.block_ids[:2] and r2.block_ids[2] not in r1.block_ids
    assert r2.num_computed_tokens == 8
    assert b.stats["prefix_hits"] == 8 and b.stats["prefix_queries"] == 10 + 11
    assert b.stats["usage"] == 4 and b.num_free() == 4
    b.check()
    b.free(r1)
    b.check()
    assert b.num_free() == 5  # the shared blocks are still held by r2
    b.free(r2)
    assert b.num_free() == 8 and r2.block_ids == [] and r2.num_computed_tokens == 0
    b.check()


def test_never_matches_the_whole_sequence() -> None:
    b = BlockManager(8, 4)
    r1 = Request("r1", list(range(8)), 4)
    assert b.allocate(r1, 8)
    computed(b, r1)
    # 8 identical tokens: at least the last one must be computed to get logits, so one block only.
    assert len(b.match_prefix(list(range(8)))) == 1
    assert len(b.match_prefix(list(range(9)))) == 2
    assert b.match_prefix([0]) == []


def test_freed_blocks_stay_cached_and_are_evicted_lru_tail_first() -> None:
    b = BlockManager(4, 4)
    r1 = Request("r1", list(range(16)), 1)
    assert b.allocate(r1, 16)
    computed(b, r1)
    table = list(r1.block_ids)
    b.free(r1)
    assert b.num_free() == 4 and b.stats["usage"] == 0
    assert b.match_prefix([*range(16), 5]) == table  # still cached
    other = Request("x", [70, 71], 1)
    assert b.allocate(other, 2)
    assert other.block_ids == [table[3]]  # the tail was freed first, so it is evicted first
    assert b.match_prefix([*range(16), 5]) == table[:3]
    b.check()
    b.free(other)
    again = Request("r1b", [*range(12), 5], 1)  # takes back the cached head, one fresh block for the rest
    assert b.allocate(again, 13) and again.block_ids == [*table[:3], table[3]] and again.num_computed_tokens == 12
    b.check()


def test_prefix_caching_off_never_matches() -> None:
    b = BlockManager(8, 4, prefix_caching=False)
    r1 = Request("r1", list(range(10)), 4)
    assert b.allocate(r1, 10)
    computed(b, r1)
    r2 = Request("r2", list(range(10)), 4)
    assert b.match_prefix(r2.all_ids) == [] and b.allocate(r2, 10) and r2.num_computed_tokens == 0
    assert not set(r1.block_ids) & set(r2.block_ids)
    b.free(r1)
    b.free(r2)
    assert b.stats["prefix_hits"] == 0 and b.stats["prefix_hit_rate"] is None
    b.check()


def test_same_content_computed_twice_registers_once() -> None:
    b = BlockManager(8, 4)
    r1, r2 = Request("r1", list(range(9)), 1), Request("r2", list(range(9)), 1)
    assert b.allocate(r1, 9) and b.allocate(r2, 9)  # both before either commits: no sharing
    computed(b, r1)
    computed(b, r2)
    b.check()
    first = list(r1.block_ids)
    b.free(r2)  # its duplicates were never registered: they go straight back to the free list
    assert b.num_free() == 5
    b.free(r1)
    b.check()
    assert b.match_prefix(list(range(9))) == first[:2]


def test_block_hash_names_the_whole_prefix() -> None:
    a = block_hash(b"", [1, 2])
    assert block_hash(a, [3, 4]) != block_hash(block_hash(b"", [9, 9]), [3, 4])
    assert block_hash(b"", [1, 2]) == a and len(a) == 32


def test_check_catches_broken_state() -> None:
    b = BlockManager(4, 4)
    r = Request("r", list(range(8)), 1)
    assert b.allocate(r, 8)
    b.check()
    r.block_ids.append(r.block_ids[0])
    with pytest.raises(AssertionError, match="twice"):
        b.check()
    r.block_ids.pop()
    r.block_ids.clear()  # dropped without free(): a leak
    with pytest.raises(AssertionError, match="leaked"):
        b.check()


# --- state machine --------------------------------------------------------------------------------


class BlockMachine(RuleBasedStateMachine):
    """Requests over a small pool with heavily shared prefixes; a fake KV records what each block holds."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from((1, 2, 3, 4)),
                prefix_caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.b = BlockManager(num_blocks, block_size, prefix_caching)
        self.live: dict[str, Request] = {}
        self.content: dict[int, list[int | None]] = {i: [None] * block_size for i in range(num_blocks)}
        self.count = 0

    def holders(self, block: int) -> list[str]:
        return [rid for rid, r in self.live.items() if block in r.block_ids]

    def try_allocate(self, r: Request, n: int) -> None:
        b = self.b
        before = (list(r.block_ids), r.num_computed_tokens, b.num_free())
        if r.block_ids:
            matched: list[int] = []
        else:
            matched = b.match_prefix(r.all_ids)
        revived = sum(1 for blk in matched if not self.holders(blk))
        fresh = max(0, b.blocks_needed(n) - len(r.block_ids) - len(matched))
        ok = b.allocate(r, n)
        assert ok == (fresh <= before[2] - revived), f"allocate said {ok} for {fresh} fresh, {revived} revived"
        if not ok:
            assert (list(r.block_ids), r.num_computed_tokens, b.num_free()) == before, "failed allocate changed state"
            return
        self.live[r.request_id] = r
        assert len(r.block_ids) == max(len(before[0]) + len(matched), b.blocks_needed(n))
        assert len(matched) * b.block_size < r.num_tokens, "matched the whole sequence: no token left to compute"
        if matched:
            assert r.block_ids[: len(matched)] == matched and r.num_computed_tokens == len(matched) * b.block_size
            bs = b.block_size
            for i, blk in enumerate(matched):  # a matched block really holds these tokens
                assert self.content[blk] == r.all_ids[i * bs : (i + 1) * bs], f"block {blk} matched wrong content"
        for blk in r.block_ids[len(before[0]) + len(matched) :]:
            assert self.holders(blk) == [r.request_id], f"fresh block {blk} is also held by {self.holders(blk)}"

    @rule(n=st.integers(1, 14), shared=st.integers(0, 14), seed=st.integers(0, 3))
    def new_request(self, n: int, shared: int, seed: int) -> None:
        tokens = [t % 3 for t in range(min(n, shared))] + [(seed * 7 + i) % 5 for i in range(n - min(n, shared))]
        r = Request(f"q{self.count}", tokens, 4)
        self.count += 1
        self.try_allocate(r, r.num_tokens)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), token=st.integers(0, 4))
    def grow(self, data: st.DataObject, token: int) -> None:
        r = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        r.output_ids.append(token)
        self.try_allocate(r, r.num_tokens)
        if r.num_tokens > len(r.block_ids) * self.b.block_size:
            r.output_ids.pop()  # no room: the token is not kept

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        r = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        bs = self.b.block_size
        end = min(r.num_tokens, len(r.block_ids) * bs)
        ids = r.all_ids
        for pos in range(r.num_computed_tokens, end):  # the runner writes K/V into its own blocks only
            blk = r.block_ids[pos // bs]
            assert self.holders(blk) == [r.request_id], f"writing into block {blk} shared with {self.holders(blk)}"
            self.content[blk][pos % bs] = ids[pos]
        r.num_computed_tokens = end
        self.b.commit(r)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        r = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.b.free(r)
        assert r.block_ids == [] and r.num_computed_tokens == 0

    @invariant()
    def exact(self) -> None:
        if not hasattr(self, "b"):
            return
        self.b.check()
        used = set().union(*(r.block_ids for r in self.live.values())) if self.live else set()
        assert self.b.stats["usage"] == len(used) and self.b.num_free() == self.b.num_blocks - len(used)

    def teardown(self) -> None:
        if hasattr(self, "b"):
            for r in list(self.live.values()):
                self.b.free(r)
            self.b.check()
            assert self.b.num_free() == self.b.num_blocks, "blocks leaked"


BlockMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None, database=None,
                                          derandomize=True, suppress_health_check=list(HealthCheck))
TestBlockMachine = BlockMachine.TestCase

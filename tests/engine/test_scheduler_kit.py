"""The scheduler family: both builtins pass the SDK kit, the kit catches broken schedulers,
and the continuous scheduler's own policy (decodes first, chunks, preemption, bad options)."""
from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from dsr1.config import PluginChoice
from dsr1.engine.blocks import BlockManager
from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.request import Request, RequestStatus
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1.scheduler.continuous import ContinuousOptions, ContinuousScheduler
from dsr1.scheduler.static import StaticOptions, StaticScheduler
from dsr1_sdk.testing import SchedulerConformance
from dsr1_sdk.testing.scheduler import (
    CASES,
    VOCAB,
    SchedulerCase,
    SchedulerDriver,
    check_scheduler_trace,
    solo_output,
)


class TestContinuous(SchedulerConformance):
    plugin = "continuous"
    options: ClassVar[dict[str, object]] = {"max_num_seqs": 4, "max_num_batched_tokens": 16}


class TestContinuousWholePrefill(SchedulerConformance):
    plugin = "continuous"
    options: ClassVar[dict[str, object]] = {"max_num_seqs": 3, "max_num_batched_tokens": 12, "chunked_prefill": False}


class TestStatic(SchedulerConformance):
    plugin = "static"
    options: ClassVar[dict[str, object]] = {"max_batch_size": 3}


# --- the kit catches broken schedulers ----------------------------------------------------------


def continuous(**options: object) -> ContinuousScheduler:
    return ContinuousScheduler(ContinuousOptions.model_validate({"max_num_seqs": 4, "max_num_batched_tokens": 16,
                                                                 **options}))


class Overtaker(ContinuousScheduler):
    """Admits whatever fits whole, skipping a head that does not: later arrivals overtake it."""

    def _admit(self, plan: list[ScheduledRequest], budget: int) -> None:
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.options.max_num_seqs:
                return
            if request.num_tokens > budget or not self.blocks.allocate(request, request.num_tokens):
                continue
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.append(self.chunk(request, request.num_tokens - request.num_computed_tokens))
            budget -= request.num_tokens


class LeaksOnFinish(ContinuousScheduler):
    """Drops a finished request's block table without returning its blocks to the pool."""

    def _finish(self, request: Request, status: RequestStatus) -> None:
        (self.running if request.status is RequestStatus.RUNNING else self.waiting).remove(request)
        request.block_ids.clear()
        request.status = status
        del self.requests[request.request_id]
        self._finished_since.append(request.request_id)


class PreemptKeepsCache(ContinuousScheduler):
    """Preempts without freeing: the request keeps its blocks and computed count while waiting."""

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)


class StaleTable(ContinuousScheduler):
    """Hands the runner the block table from before this step's allocation."""

    def schedule(self) -> SchedulerOutput:
        tables = {r.request_id: tuple(r.block_ids) for r in self.running}
        plan = super().schedule()
        return SchedulerOutput(tuple(ScheduledRequest(s.request_id, s.token_ids, s.start,
                                                      tables.get(s.request_id, s.block_ids), s.sample)
                                     for s in plan.scheduled), plan.preempted, plan.finished)


class IgnoresBudget(ContinuousScheduler):
    """Prefills whole prompts whatever the token budget."""

    def _chunk_size(self, remaining: int, budget: int, others: bool) -> int:
        return remaining


class NeverAdmitsLong(ContinuousScheduler):
    """Starves any prompt longer than 20 tokens."""

    def _admit(self, plan: list[ScheduledRequest], budget: int) -> None:
        if self.waiting and self.waiting[0].num_tokens > 20:
            return
        super()._admit(plan, budget)


class RecomputesSharedPrefix(ContinuousScheduler):
    """Throws away a prefix-cache hit and recomputes into the shared blocks."""

    def _admit(self, plan: list[ScheduledRequest], budget: int) -> None:
        before = len(plan)
        super()._admit(plan, budget)
        for i in range(before, len(plan)):
            request = self.requests[plan[i].request_id]
            if request.num_computed_tokens:
                n = len(plan[i].token_ids)
                request.num_computed_tokens = 0
                plan[i] = self.chunk(request, n)


class ForgetsFinished(ContinuousScheduler):
    """Never tells the runner which requests finished."""

    def take_finished(self) -> tuple[str, ...]:
        super().take_finished()
        return ()


BROKEN: dict[str, tuple[type[ContinuousScheduler], str, str]] = {
    "overtakes FIFO": (Overtaker, "budget smaller than a prompt", "not FIFO"),
    "leaks blocks": (LeaksOnFinish, "one request", "leaked|holds blocks"),
    "preempts without freeing": (PreemptKeepsCache, "preemption under decode", "want waiting, none, 0"),
    "stale block table": (StaleTable, "one request", "plan block table"),
    "ignores the budget": (IgnoresBudget, "budget smaller than a prompt", "the budget is 16"),
    "starves long prompts": (NeverAdmitsLong, "budget smaller than a prompt", "starvation"),
    "recomputes into shared blocks": (RecomputesSharedPrefix, "shared prefix", "shared block is never written"),
    "forgets finished ids": (ForgetsFinished, "one-token prompts and outputs", "plan.finished"),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_kit_catches_broken_scheduler(bug: str) -> None:
    impl, case, message = BROKEN[bug]
    with pytest.raises(AssertionError, match=message):
        check_scheduler_trace(impl(ContinuousOptions(max_num_seqs=4, max_num_batched_tokens=16)), CASES[case],
                              max_num_seqs=4, max_num_batched_tokens=16)


def test_kit_passes_the_right_one_on_the_same_cases() -> None:
    for _, case, _ in BROKEN.values():
        check_scheduler_trace(continuous(), CASES[case], max_num_seqs=4, max_num_batched_tokens=16)


def test_kit_catches_a_runner_visible_corruption() -> None:
    """A block table pointing at another request's block is read back as the wrong context."""

    class SwapsTables(ContinuousScheduler):
        def schedule(self) -> SchedulerOutput:
            plan = super().schedule()
            if len(plan.scheduled) < 2:
                return plan
            a, b, *rest = plan.scheduled
            return SchedulerOutput((ScheduledRequest(a.request_id, a.token_ids, a.start, b.block_ids, a.sample),
                                    b, *rest), plan.preempted, plan.finished)

    with pytest.raises(AssertionError, match="block table|reads position"):
        check_scheduler_trace(SwapsTables(ContinuousOptions(max_num_seqs=4, max_num_batched_tokens=16)),
                              CASES["more requests than seqs"], max_num_seqs=4, max_num_batched_tokens=16)


# --- continuous: its own policy ----------------------------------------------------------------------


def bound(scheduler: ContinuousScheduler | StaticScheduler, num_blocks: int = 16, block_size: int = 4,
          max_model_len: int = 64, prefix_caching: bool = True) -> SchedulerDriver:
    opts = scheduler.options
    return SchedulerDriver(scheduler, BlockManager(num_blocks, block_size, prefix_caching), max_model_len,
                           getattr(opts, "max_num_seqs", getattr(opts, "max_batch_size", None)),
                           getattr(opts, "max_num_batched_tokens", None))


def steady(n: int, max_tokens: int, skip: int = 0) -> list[int]:
    """A prompt of ``n`` equal tokens whose fake-model output runs to ``max_tokens`` (no early stop)."""
    fits = [t for t in range(1, VOCAB) if len(solo_output([t] * n, max_tokens)) == max_tokens]
    return [fits[skip]] * n


def shape(plan: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request_id, s.start, len(s.token_ids)) for s in plan.scheduled]


def test_chunked_prefill_shares_steps_with_decodes() -> None:
    d = bound(continuous(max_num_batched_tokens=8))
    d.add("a", steady(3, 8), 8)
    d.add("b", steady(20, 2), 2)
    assert shape(d.step()) == [("a", 0, 3), ("b", 0, 5)]  # b's first chunk: what the budget leaves
    assert shape(d.step()) == [("a", 3, 1), ("b", 5, 7)]  # decodes first, then the chunk
    d.add("c", [3] * 2, 2)
    assert shape(d.step()) == [("a", 4, 1), ("b", 12, 7)]  # c waits: b's prefill is not done
    plan = d.step()
    assert shape(plan) == [("a", 5, 1), ("b", 19, 1), ("c", 0, 2)]
    assert [s.sample for s in plan.scheduled] == [True, True, True]
    d.drain()


def test_whole_prefill_runs_alone_when_over_budget() -> None:
    d = bound(continuous(max_num_batched_tokens=8, chunked_prefill=False))
    d.add("long", [1] * 20, 2)
    d.add("short", [2] * 3, 2)
    assert shape(d.step()) == [("long", 0, 20)]  # alone, over the budget
    assert shape(d.step()) == [("long", 20, 1), ("short", 0, 3)]
    d.drain()


def test_preempts_the_newest_and_recomputes_its_outputs() -> None:
    d = bound(continuous(max_num_batched_tokens=16), num_blocks=4, block_size=4)
    old = d.add("old", steady(5, 10), 10)
    new = d.add("new", steady(5, 10, skip=1), 10)
    for _ in range(10):
        if d.step().preempted:
            break
    assert new.status is RequestStatus.WAITING and new.num_preemptions == 1 and new.block_ids == []
    assert old.status is RequestStatus.RUNNING and d.scheduler.waiting[0] is new
    kept = list(new.output_ids)
    assert kept, "the newest had generated tokens before it was preempted"
    plan = d.step()
    assert "new" not in {s.request_id for s in plan.scheduled}  # readmitted only once the old one fits
    while "new" not in {s.request_id for s in plan.scheduled}:
        plan = d.step()
    s = next(s for s in plan.scheduled if s.request_id == "new")
    assert list(s.token_ids) == [*new.prompt_ids, *kept][s.start :]  # its outputs are recomputed as prompt
    d.drain()
    assert d.done["old"].output_ids == d.expected["old"] and d.done["new"].output_ids == d.expected["new"]


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    d = bound(continuous())
    prefix = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    d.add("first", prefix, 2)
    d.drain()
    d.add("second", [*prefix, 1, 2], 2)
    plan = d.step()
    assert shape(plan) == [("second", 8, 3)]  # two full blocks came from the cache
    d.drain()
    assert d.blocks.stats["prefix_hits"] == 8


def test_budget_smaller_than_a_block_is_refused_with_the_key_path() -> None:
    with pytest.raises(Dsr1Error, match=r"scheduler\.options\.max_num_batched_tokens = 8 .*\(16 tokens\)"):
        continuous(max_num_batched_tokens=8).bind(BlockManager(4, 16), 64)


def test_bad_options_name_the_key_path() -> None:
    registry = PluginRegistry()
    for key, value in (("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("typo_seqs", 1)):
        with pytest.raises(Dsr1Error, match=rf"scheduler\.options\.{key}"):
            registry.make("scheduler", PluginChoice.model_validate({"name": "continuous", "options": {key: value}}))


def test_static_reserves_whole_requests_and_runs_batches_to_completion() -> None:
    d = bound(StaticScheduler(StaticOptions(max_batch_size=2)), num_blocks=8)
    for i in range(3):
        d.add(f"r{i}", [i + 1] * 6, 4)  # 10 tokens: 3 blocks reserved each
    first = d.step()
    assert shape(first) == [("r0", 0, 6), ("r1", 0, 6)]
    assert all(len(s.block_ids) == 3 for s in first.scheduled)
    while d.live.keys() & {"r0", "r1"}:
        assert "r2" not in {s.request_id for s in d.step().scheduled}
    d.drain()


def test_static_legacy_queue_still_batches() -> None:
    """Legacy: removed when generate runs on the engine."""
    from dsr1.interfaces import Request as LegacyRequest

    s = StaticScheduler(StaticOptions(max_batch_size=2))
    for i in range(3):
        s.add(LegacyRequest(request_id=i, prompt_ids=[1], max_new_tokens=1))
    assert [r.request_id for r in s.next_batch()] == [0, 1] and s.has_pending()
    assert not s.has_unfinished()  # the legacy queue is not the engine's


def test_schedulers_and_blocks_import_no_torch() -> None:
    code = ("import sys, dsr1.scheduler.continuous, dsr1.scheduler.static, dsr1.engine.blocks, dsr1.engine.plan, "
            "dsr1_sdk.testing.scheduler; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_a_custom_case_runs_through_the_kit() -> None:
    case = SchedulerCase(5, 2, (3, 3, 3), (6, 6, 6), arrivals=(0, 1, 2), shared_prefix=2)
    d = check_scheduler_trace(continuous(max_num_batched_tokens=4), case, max_num_seqs=4, max_num_batched_tokens=4)
    assert set(d.done) == {"r0", "r1", "r2"} and d.blocks.num_free() == 5

"""Scheduler conformance: a scheduler driven by the engine loop over a FAKE runner.

The kit plays the engine: ``plan = schedule()`` → a fake runner executes the plan →
``update(plan, sampled, stopped)``. The fake runner keeps a fake KV pool (which token at
which position each block slot holds): it writes every fed token into the slot the plan's
block table names and reads each scheduled request's whole context back through the table,
so a wrong table, a block shared or reused too early, or a wrong start position shows up as a
wrong context. Its "model" samples ``fake_next_token(context)`` (deterministic, with a stop
token), so every request's output can be compared with running it alone.

Checked at every step (:class:`SchedulerDriver`): each planned row starts at the request's
``num_computed_tokens`` and feeds exactly its next tokens, its block table covers them, it
samples exactly when it reaches the end of the known tokens, no request appears twice, the
sequence cap and token budget hold (a lone request may exceed the budget), preempted
requests hold no blocks, ``finished`` reports every request finished or aborted since the
previous plan, a waiting request is never overtaken by a later arrival (FIFO), the block
manager's invariants hold, and every output equals the request run alone. Draining a run
finishes every request within a bounded number of steps and leaves every block free or
evictable.

A scheduler's limits are read from its options (``max_num_seqs`` or ``max_batch_size``,
and ``max_num_batched_tokens``); override :meth:`SchedulerConformance.limits` for others.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsr1.engine.blocks import BlockManager
from dsr1.engine.plan import SchedulerOutput
from dsr1.engine.request import Request, RequestStatus
from dsr1.errors import Dsr1Error
from dsr1.interfaces import Scheduler
from dsr1_sdk.testing.base import PluginConformance

#: the fake model's vocabulary size and stop token (about one token in 31 stops a request).
VOCAB = 31
STOP = 0


def fake_next_token(context: Sequence[int]) -> int:
    """The fake model: the next token after ``context`` (depends on its last tokens and length)."""
    n = len(context)
    a = context[-1]
    b = context[-2] if n > 1 else 7
    c = context[-3] if n > 2 else 3
    return (a * 7 + b * 13 + c * 5 + n * 11 + 1) % VOCAB


def solo_output(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """What the fake model generates for ``prompt`` run alone (the stop token is kept)."""
    ids, out = list(prompt), []
    while len(out) < max_tokens:
        token = fake_next_token(ids)
        ids.append(token)
        out.append(token)
        if token == STOP:
            break
    return out


class SchedulerDriver:
    """The engine loop over a fake runner, checking the scheduler at every step (AssertionError)."""

    def __init__(self, scheduler: Scheduler, blocks: BlockManager, max_model_len: int,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None) -> None:
        scheduler.bind(blocks, max_model_len)
        self.scheduler, self.blocks = scheduler, blocks
        self.max_model_len = max_model_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        bs = blocks.block_size
        self.kv: list[list[tuple[int, int] | None]] = [[None] * bs for _ in range(blocks.num_blocks)]
        self.arrival: dict[str, int] = {}  # id -> arrival index
        self.live: dict[str, Request] = {}
        self.expected: dict[str, list[int]] = {}
        self.done: dict[str, Request] = {}
        self.unreported: set[str] = set()  # finished or aborted, not yet in a plan's `finished`
        self.steps = 0
        self.preemptions = 0

    # --- the engine's calls ----------------------------------------------------------------

    def add(self, request_id: str, prompt: Sequence[int], max_tokens: int) -> Request:
        request = Request(request_id=request_id, prompt_ids=list(prompt), max_tokens=max_tokens,
                          arrival=float(len(self.arrival)))
        self.scheduler.add(request)
        self.arrival[request_id] = len(self.arrival)
        self.live[request_id] = request
        self.expected[request_id] = solo_output(prompt, max_tokens)
        return request

    def abort(self, request_id: str) -> Request:
        request = self.scheduler.abort(request_id)
        where = f"abort({request_id!r})"
        assert request is self.live[request_id], f"{where} returned another Request object"
        assert request.status is RequestStatus.FINISHED_ABORTED, f"{where}: status {request.status}, not aborted"
        assert not request.block_ids, f"{where} kept blocks {request.block_ids}"
        assert self.scheduler.get(request_id) is None, f"{where}: get() still returns it"
        self._retire(request)
        return request

    def step(self) -> SchedulerOutput:
        before = {rid: r.status for rid, r in self.live.items()}
        plan = self.scheduler.schedule()
        self.steps += 1
        self.check_plan(plan, before)
        sampled, stopped = self.execute(plan)
        finished = self.scheduler.update(plan, sampled, stopped)
        self.check_update(plan, finished, sampled)
        return plan

    def drain(self, max_steps: int | None = None) -> None:
        """Step until nothing is unfinished, at most ``max_steps`` (default: every token once, plus slack)."""
        bound = max_steps if max_steps is not None else self.step_bound()
        for _ in range(bound):
            if not self.scheduler.has_unfinished():
                break
            self.step()
            self.check_invariants()
        stuck = {rid: r.status.value for rid, r in self.live.items()}
        assert not self.scheduler.has_unfinished() and not stuck, (
            f"not finished after {bound} steps (starvation or livelock): {stuck}")
        if self.unreported:
            self.step()  # the plan after the last update reports the last finished ids
        assert not self.unreported, f"finished ids never reported in a plan's `finished`: {sorted(self.unreported)}"
        self.blocks.check()
        assert self.blocks.num_free() == self.blocks.num_blocks, (
            f"{self.blocks.num_blocks - self.blocks.num_free()} blocks still used with no request left: leaked")

    def step_bound(self) -> int:
        """Steps a scheduler that always advances its oldest request needs at most to finish everything."""
        return sum(len(r.prompt_ids) + r.max_tokens for r in self.live.values()) + len(self.live) + 8

    # --- the fake runner -------------------------------------------------------------------

    def execute(self, plan: SchedulerOutput) -> tuple[dict[str, int], dict[str, str]]:
        bs = self.blocks.block_size
        holders: dict[int, list[str]] = {}
        for rid, r in self.live.items():
            for block in r.block_ids:
                holders.setdefault(block, []).append(rid)
        sampled: dict[str, int] = {}
        stopped: dict[str, str] = {}
        for s in plan.scheduled:
            request = self.live[s.request_id]
            for j, token in enumerate(s.token_ids):
                pos = s.start + j
                block = s.block_ids[pos // bs]
                others = [o for o in holders.get(block, []) if o != s.request_id]
                assert not others, (f"step {self.steps}: {s.request_id!r} writes position {pos} into block {block}, "
                                    f"which {others} also hold (a shared block is never written)")
                self.kv[block][pos % bs] = (token, pos)
            end = s.start + len(s.token_ids)
            ids = request.all_ids
            context: list[int] = []
            for pos in range(end):  # attention reads the whole context through the block table
                block = s.block_ids[pos // bs]
                slot = self.kv[block][pos % bs]
                assert slot == (ids[pos], pos), (
                    f"step {self.steps}: {s.request_id!r} reads position {pos} from block {block} slot {pos % bs}, "
                    f"which holds {slot} (token, position); want ({ids[pos]}, {pos})")
                context.append(slot[0])
            if s.sample:
                token = fake_next_token(context)
                k = len(request.output_ids)
                want = self.expected[s.request_id]
                assert k < len(want) and token == want[k], (
                    f"step {self.steps}: {s.request_id!r} samples output #{k} = {token}, running alone gives "
                    f"{want[k] if k < len(want) else 'nothing (it had finished)'}")
                sampled[s.request_id] = token
                if token == STOP:
                    stopped[s.request_id] = "stop"
        return sampled, stopped

    # --- checks ----------------------------------------------------------------------------

    def check_plan(self, plan: SchedulerOutput, before: dict[str, RequestStatus]) -> None:
        at = f"step {self.steps}"
        bs = self.blocks.block_size
        assert set(plan.finished) == self.unreported and len(plan.finished) == len(set(plan.finished)), (
            f"{at}: plan.finished = {sorted(plan.finished)}, but finished or aborted since the last plan: "
            f"{sorted(self.unreported)}")
        self.unreported.clear()
        ids = [s.request_id for s in plan.scheduled]
        assert len(ids) == len(set(ids)), f"{at}: a request is scheduled twice: {ids}"
        for rid in plan.preempted:
            r = self.live.get(rid)
            assert r is not None, f"{at}: preempted {rid!r} is not a live request"
            assert rid not in ids, f"{at}: {rid!r} is both preempted and scheduled"
            assert r.status is RequestStatus.WAITING and not r.block_ids and r.num_computed_tokens == 0, (
                f"{at}: preempted {rid!r} is {r.status.value} with blocks {r.block_ids} and "
                f"{r.num_computed_tokens} computed tokens; want waiting, none, 0")
            self.preemptions += 1
        if self.max_num_seqs is not None:
            assert len(ids) <= self.max_num_seqs and self.scheduler.num_running <= self.max_num_seqs, (
                f"{at}: {len(ids)} scheduled, {self.scheduler.num_running} running; max_num_seqs is "
                f"{self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and len(ids) > 1:
            assert plan.num_tokens <= self.max_num_batched_tokens, (
                f"{at}: {plan.num_tokens} tokens in one step of {len(ids)} requests; the budget is "
                f"{self.max_num_batched_tokens}")
        for s in plan.scheduled:
            r = self.live.get(s.request_id)
            assert r is not None, f"{at}: scheduled {s.request_id!r} is not a live request"
            n, end = len(s.token_ids), s.start + len(s.token_ids)
            where = f"{at}: {s.request_id!r}"
            assert r.status is RequestStatus.RUNNING, f"{where} is scheduled but {r.status.value}"
            assert all(type(t) is int for t in s.token_ids) and isinstance(s.token_ids, tuple), (
                f"{where}: token_ids must be a tuple of ints (plain data), got {type(s.token_ids).__name__}")
            assert n >= 1, f"{where} is scheduled with no tokens"
            assert s.start == r.num_computed_tokens, (
                f"{where} starts at {s.start}, but {r.num_computed_tokens} of its tokens are computed")
            assert end <= r.num_tokens, f"{where} feeds up to {end}, past its {r.num_tokens} known tokens"
            assert list(s.token_ids) == r.all_ids[s.start:end], (
                f"{where} feeds {list(s.token_ids)}, its tokens [{s.start}:{end}] are {r.all_ids[s.start:end]}")
            assert tuple(s.block_ids) == tuple(r.block_ids), (
                f"{where}: plan block table {s.block_ids} != the request's {r.block_ids}")
            assert len(s.block_ids) * bs >= end, (
                f"{where}: {len(s.block_ids)} blocks of {bs} cannot hold {end} tokens")
            assert s.sample == (end == r.num_tokens), (
                f"{where}: sample={s.sample} but the chunk ends at {end} of {r.num_tokens} known tokens")
            if before.get(s.request_id) is RequestStatus.WAITING:  # admitted this step: FIFO
                mine = self.arrival[s.request_id]
                overtaken = [o for o, q in self.live.items()
                             if self.arrival[o] < mine and q.status is RequestStatus.WAITING]
                assert not overtaken, f"{where} (arrival #{mine}) overtook earlier waiting {overtaken}: not FIFO"
        self.check_invariants()

    def check_update(self, plan: SchedulerOutput, finished: list[Request], sampled: dict[str, int]) -> None:
        at = f"step {self.steps}"
        got = {r.request_id for r in finished}
        for s in plan.scheduled:
            r = self.live[s.request_id]
            should_end = s.request_id in sampled and (
                sampled[s.request_id] == STOP or len(r.output_ids) >= r.max_tokens)
            assert (s.request_id in got) == should_end, (
                f"{at}: {s.request_id!r} {'finished' if s.request_id in got else 'did not finish'} in update; "
                f"its output is {r.output_ids} of max_tokens {r.max_tokens}")
            if s.request_id not in got:
                end = s.start + len(s.token_ids)
                assert r.num_computed_tokens == end, (
                    f"{at}: {s.request_id!r} has {r.num_computed_tokens} computed tokens after update, want {end}")
        for r in finished:
            rid = r.request_id
            assert rid in self.live and r is self.live[rid], f"{at}: update returned unknown request {rid!r}"
            want_reason = RequestStatus.FINISHED_STOPPED if r.output_ids[-1:] == [STOP] else (
                RequestStatus.FINISHED_LENGTH)
            assert r.status is want_reason, f"{at}: {rid!r} finished as {r.status.value}, want {want_reason.value}"
            assert r.output_ids == self.expected[rid], (
                f"{at}: {rid!r} output {r.output_ids}; running alone gives {self.expected[rid]}")
            assert not r.block_ids, f"{at}: finished {rid!r} still holds blocks {r.block_ids}"
            assert self.scheduler.get(rid) is None, f"{at}: get({rid!r}) still returns the finished request"
            self._retire(r)
        self.check_invariants()

    def check_invariants(self) -> None:
        self.blocks.check()
        sched = self.scheduler
        waiting = [rid for rid, r in self.live.items() if r.status is RequestStatus.WAITING]
        running = [rid for rid, r in self.live.items() if r.status is RequestStatus.RUNNING]
        assert len(waiting) + len(running) == len(self.live), "a live request is neither waiting nor running"
        assert (sched.num_waiting, sched.num_running) == (len(waiting), len(running)), (
            f"num_waiting/num_running = {sched.num_waiting}/{sched.num_running}, the requests say "
            f"{len(waiting)}/{len(running)}")
        assert sched.has_unfinished() == bool(self.live), (
            f"has_unfinished() is {sched.has_unfinished()} with {len(self.live)} live requests")
        for rid, r in self.live.items():
            assert sched.get(rid) is r, f"get({rid!r}) does not return the live request"
            want = self.expected[rid]
            assert r.output_ids == want[: len(r.output_ids)], (
                f"{rid!r} output so far {r.output_ids}; running alone gives {want}")
            if r.status is RequestStatus.WAITING:
                assert not r.block_ids and r.num_computed_tokens == 0, (
                    f"waiting {rid!r} holds blocks {r.block_ids} / {r.num_computed_tokens} computed tokens")
            assert r.num_computed_tokens <= len(r.block_ids) * self.blocks.block_size, (
                f"{rid!r}: {r.num_computed_tokens} computed tokens but only {len(r.block_ids)} blocks")

    def _retire(self, request: Request) -> None:
        del self.live[request.request_id]
        self.done[request.request_id] = request
        self.unreported.add(request.request_id)


# --- named cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerCase:
    """One trace: a KV pool and requests arriving at given steps (prompt tokens drawn from ``seed``)."""

    num_blocks: int
    block_size: int
    prompts: tuple[int, ...]  # prompt lengths
    max_tokens: tuple[int, ...] | int
    arrivals: tuple[int, ...] = ()  # step at which each request is added (default: all before step 0)
    shared_prefix: int = 0  # leading tokens every prompt shares (cut to the prompt's length)
    aborts: tuple[tuple[int, int], ...] = ()  # (step, request index): aborted then, if still live
    prefix_caching: bool = True
    max_model_len: int = 256
    seed: int = 0

    def requests(self) -> list[tuple[str, list[int], int]]:
        rng = random.Random(self.seed)
        prefix = [rng.randrange(VOCAB) for _ in range(self.shared_prefix)]
        caps = self.max_tokens if isinstance(self.max_tokens, tuple) else (self.max_tokens,) * len(self.prompts)
        out = []
        for i, (n, cap) in enumerate(zip(self.prompts, caps, strict=True)):
            head = prefix[:n]
            out.append((f"r{i}", head + [rng.randrange(VOCAB) for _ in range(n - len(head))], cap))
        return out


CASES: dict[str, SchedulerCase] = {
    "one request": SchedulerCase(8, 4, (9,), 12),
    "one-token prompts and outputs": SchedulerCase(8, 4, (1, 1, 2, 1), 1),
    "more requests than seqs": SchedulerCase(64, 4, (3, 5, 7, 2, 9, 4, 6, 8, 3, 5, 11, 2), 6),
    "budget smaller than a prompt": SchedulerCase(64, 8, (70, 5, 90, 33, 2), 5, seed=1),
    "pool fits one request": SchedulerCase(6, 4, (10, 12, 9, 14), (12, 10, 14, 9), seed=2),
    "preemption under decode": SchedulerCase(10, 2, (3, 4, 2, 5, 3, 1), (16, 15, 17, 14, 16, 18), seed=3),
    "shared prefix": SchedulerCase(40, 4, (14, 17, 13, 20, 15, 12), 5, arrivals=(0, 3, 6, 9, 12, 12),
                                   shared_prefix=12, seed=4),
    "shared prefix, small pool": SchedulerCase(9, 4, (14, 17, 13, 20, 15), 9, arrivals=(0, 0, 2, 5, 5),
                                               shared_prefix=12, seed=5),
    "prefix caching off": SchedulerCase(40, 4, (14, 17, 13), 5, arrivals=(0, 3, 6), shared_prefix=12,
                                        prefix_caching=False, seed=4),
    "staggered arrivals": SchedulerCase(24, 4, (5, 9, 3, 14, 7, 2, 11, 6), (8, 4, 12, 6, 9, 3, 7, 10),
                                        arrivals=(0, 1, 1, 2, 5, 8, 8, 13), seed=6),
    "aborts": SchedulerCase(12, 4, (6, 9, 4, 12, 5, 7), 10, aborts=((0, 5), (2, 0), (4, 3), (9, 2)), seed=7),
    "block size 1": SchedulerCase(20, 1, (4, 6, 3, 5), (6, 5, 8, 4), seed=8),
}


def check_scheduler_trace(scheduler: Scheduler, case: SchedulerCase, *, max_num_seqs: int | None = None,
                          max_num_batched_tokens: int | None = None) -> SchedulerDriver:
    """Run ``case`` through ``scheduler`` with every check of :class:`SchedulerDriver`; returns the driver."""
    blocks = BlockManager(case.num_blocks, case.block_size, prefix_caching=case.prefix_caching)
    driver = SchedulerDriver(scheduler, blocks, case.max_model_len, max_num_seqs, max_num_batched_tokens)
    requests = case.requests()
    arrivals = case.arrivals or (0,) * len(requests)
    pending = sorted(zip(arrivals, range(len(requests)), strict=True))
    aborts = sorted(case.aborts)
    bound = sum(len(p) + m for _, p, m in requests) + len(requests) + 8 + max(arrivals)
    for step in range(bound):
        while pending and pending[0][0] <= step:
            driver.add(*requests[pending.pop(0)[1]])
        while aborts and aborts[0][0] <= step:
            rid = requests[aborts.pop(0)[1]][0]
            if rid in driver.live:
                driver.abort(rid)
        if not pending and not aborts and not driver.scheduler.has_unfinished():
            break
        driver.step()
    driver.drain(max_steps=bound)
    return driver


def scheduler_machine(make: Callable[[], Scheduler], max_num_seqs: int | None,
                      max_num_batched_tokens: int | None) -> type[RuleBasedStateMachine]:
    """A hypothesis state machine: random arrivals, lengths, shared prefixes, aborts, small pools."""
    sizes = [b for b in (1, 2, 4, 8) if max_num_batched_tokens is None or b <= max_num_batched_tokens]

    class SchedulerMachine(RuleBasedStateMachine):
        driver: SchedulerDriver

        @initialize(block_size=st.sampled_from(sizes), num_blocks=st.integers(2, 16),
                    prefix_caching=st.booleans(), seed=st.integers(0, 2**16))
        def setup(self, block_size: int, num_blocks: int, prefix_caching: bool, seed: int) -> None:
            blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
            self.max_model_len = min(48, num_blocks * block_size)
            self.driver = SchedulerDriver(make(), blocks, self.max_model_len, max_num_seqs, max_num_batched_tokens)
            self.rng = random.Random(seed)
            self.prefix = [self.rng.randrange(VOCAB) for _ in range(self.max_model_len)]
            self.count = 0

        @rule(data=st.data())
        def add(self, data: st.DataObject) -> None:
            cap = self.max_model_len
            if cap < 2:
                return
            n = data.draw(st.integers(1, min(cap - 1, 30)), label="prompt")
            max_tokens = data.draw(st.integers(1, min(cap - n, 16)), label="max_tokens")
            shared = data.draw(st.integers(0, n), label="shared")
            prompt = self.prefix[:shared] + [self.rng.randrange(VOCAB) for _ in range(n - shared)]
            self.driver.add(f"m{self.count}", prompt, max_tokens)
            self.count += 1

        @rule(n=st.integers(1, 8))
        def step(self, n: int) -> None:
            for _ in range(n):
                self.driver.step()

        @precondition(lambda self: bool(self.driver.live))
        @rule(data=st.data(), now=st.integers(0, 2))
        def abort(self, data: st.DataObject, now: int) -> None:
            if now:  # one draw in three: aborts stay rarer than steps, so runs get long enough to preempt
                return
            rid = data.draw(st.sampled_from(sorted(self.driver.live)), label="abort")
            self.driver.abort(rid)

        @rule(now=st.integers(0, 3))
        def refuse(self, now: int) -> None:
            if now:
                return
            before = (self.driver.scheduler.num_waiting, self.driver.scheduler.num_running)
            with pytest.raises(Dsr1Error):
                self.driver.scheduler.add(Request("too-long", [1] * self.max_model_len, 1))
            with pytest.raises(Dsr1Error, match="no-such-id"):
                self.driver.scheduler.abort("no-such-id")
            for rid in list(self.driver.done)[-1:]:
                with pytest.raises(Dsr1Error, match=rid):
                    self.driver.scheduler.abort(rid)
            after = (self.driver.scheduler.num_waiting, self.driver.scheduler.num_running)
            assert before == after, "a refused request changed the scheduler's queues"

        @invariant()
        def consistent(self) -> None:
            if hasattr(self, "driver"):
                self.driver.check_invariants()

        def teardown(self) -> None:
            if hasattr(self, "driver"):
                self.driver.drain()

    return SchedulerMachine


# --- the kit -------------------------------------------------------------------------------------


class SchedulerConformance(PluginConformance):
    """Conformance kit of the ``scheduler`` family. Subclass it and set ``plugin`` (and ``options``)."""

    family: ClassVar[str] = "scheduler"
    CASES: ClassVar[dict[str, SchedulerCase]] = CASES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))

    def limits(self, impl: Scheduler) -> tuple[int | None, int | None]:
        """(most requests per step, most tokens per step) the scheduler promises, from its options."""
        opts = impl.options
        seqs = getattr(opts, "max_num_seqs", getattr(opts, "max_batch_size", None))
        return seqs, getattr(opts, "max_num_batched_tokens", None)

    def factory(self) -> Callable[[], Scheduler]:
        """Makes fresh instances (the spec is loaded once through a fresh registry)."""
        spec = self.load_spec()
        options = spec.options.model_validate(self.options)

        def make() -> Scheduler:
            impl: Scheduler = spec.make(options)
            return impl

        return make

    def run_case(self, case: SchedulerCase) -> SchedulerDriver:
        impl = self.factory()()
        seqs, budget = self.limits(impl)
        return check_scheduler_trace(impl, case, max_num_seqs=seqs, max_num_batched_tokens=budget)

    def driver(self, num_blocks: int = 8, block_size: int = 4, max_model_len: int = 32) -> SchedulerDriver:
        impl = self.factory()()
        seqs, budget = self.limits(impl)
        return SchedulerDriver(impl, BlockManager(num_blocks, block_size), max_model_len, seqs, budget)

    # --- tests ---------------------------------------------------------------------------------

    def test_case(self, case_name: str) -> None:
        case = type(self).CASES[case_name]
        impl = self.factory()()
        _, budget = self.limits(impl)
        if budget is not None and case.block_size > budget:
            pytest.skip(f"block size {case.block_size} is larger than the budget {budget} (refused at bind)")
        self.run_case(case)

    def test_state_machine(self) -> None:
        make = self.factory()
        seqs, budget = self.limits(make())
        machine = scheduler_machine(make, seqs, budget)
        machine.TestCase.settings = settings(
            max_examples=self.max_examples * 5, stateful_step_count=30, deadline=None, database=None,
            derandomize=True, suppress_health_check=list(HealthCheck),
        )
        machine.TestCase().runTest()

    def test_idle_plan_is_empty(self) -> None:
        d = self.driver()
        plan = d.scheduler.schedule()
        assert plan.scheduled == () and plan.preempted == () and plan.finished == (), f"idle plan {plan}"
        assert not d.scheduler.has_unfinished()

    def test_refuses_longer_than_context(self) -> None:
        d = self.driver(num_blocks=64, max_model_len=32)
        with pytest.raises(Dsr1Error) as err:
            d.scheduler.add(Request("long", [1] * 20, 13))
        line = str(err.value)
        assert "\n" not in line and "33" in line and "32" in line, f"want one line with 20+13=33 > 32: {line!r}"
        assert not d.scheduler.has_unfinished(), "a refused request was queued"

    def test_refuses_larger_than_pool(self) -> None:
        d = self.driver(num_blocks=4, block_size=4, max_model_len=100)
        with pytest.raises(Dsr1Error) as err:
            d.scheduler.add(Request("big", [1] * 10, 7))  # 17 tokens: 5 blocks of 4, the pool has 4
        line = str(err.value)
        assert "\n" not in line and "5" in line and "4" in line and "big" in line, f"want the numbers: {line!r}"
        assert not d.scheduler.has_unfinished(), "a refused request was queued"
        d.add("fits", [1] * 10, 6)  # 16 tokens: exactly the pool
        d.drain()

    def test_refuses_duplicate_id(self) -> None:
        d = self.driver()
        d.add("same", [1, 2, 3], 4)
        with pytest.raises(Dsr1Error, match="same"):
            d.scheduler.add(Request("same", [4, 5], 2))
        d.drain()
        assert d.done["same"].prompt_ids == [1, 2, 3], "the duplicate replaced the first request"

    def test_abort_unknown_or_finished(self) -> None:
        d = self.driver()
        with pytest.raises(Dsr1Error, match="nope"):
            d.scheduler.abort("nope")
        d.add("a", [1, 2, 3], 3)
        d.add("b", [4, 5, 6, 7], 3)
        d.step()
        d.abort("b")
        with pytest.raises(Dsr1Error, match="'b'"):
            d.scheduler.abort("b")
        d.drain()
        with pytest.raises(Dsr1Error, match="'a'"):
            d.scheduler.abort("a")

    def test_abort_waiting_and_running(self) -> None:
        d = self.driver(num_blocks=6, block_size=4)
        d.add("r0", [1] * 9, 10)
        d.add("r1", [2] * 9, 10)
        d.add("r2", [3] * 3, 2)
        d.step()
        for rid in ("r2", "r0"):
            d.abort(rid)
        d.drain()
        assert set(d.done) == {"r0", "r1", "r2"}


__all__ = [
    "CASES",
    "STOP",
    "VOCAB",
    "SchedulerCase",
    "SchedulerConformance",
    "SchedulerDriver",
    "check_scheduler_trace",
    "fake_next_token",
    "scheduler_machine",
    "solo_output",
]

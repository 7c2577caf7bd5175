"""The KV tier on CPU: with a pool whose ``kv_swap`` gives a :class:`SwapPolicy`, a preempted
request's KV blocks go to host memory and come back instead of being recomputed, and every
request still decodes what it decodes alone; without room or without the policy's consent the
engine recomputes, as it always did."""
from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.auto import AutoModel
from dsr1.engine import Engine
from dsr1.engine.blocks import BlockManager
from dsr1.engine.paged import PagedKV, decode_reference
from dsr1.engine.plan import SchedulerOutput
from dsr1.engine.request import Request
from dsr1.engine.runner import PagedRunner
from dsr1.engine.swap import HostKV, SwapSpace, swap_policy
from dsr1.interfaces import SamplingParams, SwapPolicy

from .conftest import make_checkpoint

Trace = list[tuple[list[int], int]]


def trace(seed: int, count: int, vocab: int = 2000) -> Trace:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(3, 40))], rng.randint(8, 24)) for _ in range(count)]


@pytest.fixture(scope="module")
def paged() -> Any:
    return AutoModel.from_pretrained("dsr1-tiny", kvcache={"name": "paged", "options": {"block_size": 4}},
                                     scheduler="continuous")


@pytest.fixture(scope="module")
def workload() -> tuple[Trace, list[list[int]]]:
    """Ten requests and what each decodes alone (the static scheduler, no paging)."""
    reference = AutoModel.from_pretrained("dsr1-tiny")
    reqs = trace(4, 10)
    return reqs, [alone(reference, p, n) for p, n in reqs]


def alone(model: Any, prompt: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, ignore_eos=True)[0, len(prompt):].tolist()


def with_policy(mp: pytest.MonkeyPatch, model: Any, policy: SwapPolicy | None, asked: list[int]) -> None:
    """Make the model's pool answer ``kv_swap`` with ``policy`` (recording the bytes per token asked about)."""
    def kv_swap(kv_bytes_per_token: int, device: torch.device) -> SwapPolicy | None:
        asked.append(kv_bytes_per_token)
        return policy

    mp.setattr(model.runtime.pipeline.pool, "kv_swap", kv_swap)


def record_plans(engine: Engine) -> list[SchedulerOutput]:
    plans: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def spy() -> SchedulerOutput:
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return plans


def run(engine: Engine, reqs: Trace) -> tuple[list[list[int]], dict[str, int]]:
    """Outputs in order, and the tokens fed per request id over every step."""
    plans = record_plans(engine)
    outs = engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs])
    fed: dict[str, int] = {}
    for plan in plans:
        for s in plan.scheduled:
            fed[s.request_id] = fed.get(s.request_id, 0) + len(s.token_ids)
        assert set(plan.swapped) <= set(plan.preempted)
    engine.blocks.check()
    assert engine.stats()["blocks_used"] == 0 and not engine.has_unfinished()
    return [list(o.output_ids) for o in outs], fed


def per_block(model: Any, block_size: int = 4) -> int:
    a = model.args
    return PagedKV.bytes_per_block(a.n_layers, block_size, a.n_kv_heads, a.head_dim, model.dtype,
                                   getattr(a, "kv_shared", False))


def always(n: int) -> bool:
    return True


def test_swapped_requests_resume_without_recomputing(
        paged: Any, workload: tuple[Trace, list[list[int]]], monkeypatch: pytest.MonkeyPatch) -> None:
    reqs, want = workload
    asked: list[int] = []
    with_policy(monkeypatch, paged, SwapPolicy(host_bytes=200 * per_block(paged), should_swap=always), asked)
    engine = Engine.with_scheduler(paged, "continuous", num_blocks=24)
    assert asked == [per_block(paged) // 4] and engine.swap_policy is not None  # asked once, per token
    assert engine.runner.host is not None and not engine.runner.host.allocated  # nothing held before a swap
    outs, fed = run(engine, reqs)
    assert outs == want
    swapped = engine.requests_swapped
    assert sum(swapped.values()) > 0 and swapped == engine.requests_preempted  # every preemption swapped
    for rid in swapped:  # a swapped request never feeds a token twice: prompt once, each output but the last once
        i = int(rid.split("-")[1])
        assert fed[rid] == len(reqs[i][0]) + reqs[i][1] - 1, rid
    swap = engine.blocks.swap
    assert swap is not None and swap.num_free() == swap.num_blocks  # every host block came back


@pytest.mark.parametrize("case", ["never", "no room", "little room"])
def test_without_consent_or_room_it_recomputes(
        paged: Any, workload: tuple[Trace, list[list[int]]], monkeypatch: pytest.MonkeyPatch,
        case: str) -> None:
    reqs, want = workload
    host, rule = {"never": (200, lambda n: False), "no room": (0, always), "little room": (3, always)}[case]
    with_policy(monkeypatch, paged, SwapPolicy(host_bytes=host * per_block(paged), should_swap=rule), [])
    engine = Engine.with_scheduler(paged, "continuous", num_blocks=24)
    assert (engine.blocks.swap is None) == (case == "no room")  # no whole block of host memory: no swap space
    outs, fed = run(engine, reqs)
    assert outs == want
    preempted, swapped = engine.requests_preempted, engine.requests_swapped
    assert sum(preempted.values()) > sum(swapped.values())  # some (or all) preemptions were recomputed
    assert (sum(swapped.values()) > 0) == (case == "little room")  # 3 host blocks take the short ones
    assert sum(fed.values()) > sum(len(p) + n - 1 for p, n in reqs)  # recomputing feeds tokens again


def test_no_policy_and_old_pools_mean_recompute(paged: Any) -> None:
    assert swap_policy(object(), 64, torch.device("cpu")) is None  # a pool plugin from before kv_swap
    engine = Engine.with_scheduler(paged, "continuous", num_blocks=24)  # the builtin single pool
    assert isinstance(engine.runner, PagedRunner)
    assert engine.swap_policy is None and engine.blocks.swap is None and engine.runner.host is None


def test_the_static_decode_rewrites_table_rows_after_a_swap(
        paged: Any, workload: tuple[Trace, list[list[int]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The static-shape decode (what CUDA captures), run eagerly: a swapped-in request gets a fresh
    table row over its new blocks."""
    reqs, want = workload
    with_policy(monkeypatch, paged, SwapPolicy(host_bytes=200 * per_block(paged), should_swap=always), [])
    engine = Engine.with_scheduler(paged, "continuous", num_blocks=24)
    assert engine.blocks.swap is not None
    engine.runner = PagedRunner(paged, engine.runner.decoder, engine.num_blocks, 4, engine.max_model_len,
                                decode_kernel=decode_reference, capture=False,
                                host_blocks=engine.blocks.swap.num_blocks)
    outs, _ = run(engine, reqs)
    assert outs == want and sum(engine.requests_swapped.values()) > 0
    decode = engine.runner.static_decode
    assert decode is not None and not decode.rows and len(decode.free_rows) == decode.max_rows


def test_shared_latent_cache_swaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-head latent attention caches one vector per token (``v`` is ``k``): one host copy of it."""
    path = make_checkpoint(tmp_path / "deepseek_v2", "deepseek_v2")
    model = AutoModel.from_pretrained(path, kvcache={"name": "paged", "options": {"block_size": 4}},
                                      scheduler="continuous")
    assert model.args.kv_shared
    reqs = trace(5, 8, vocab=400)
    reference = AutoModel.from_pretrained(path)
    want = [alone(reference, p, n) for p, n in reqs]
    with_policy(monkeypatch, model, SwapPolicy(host_bytes=200 * per_block(model), should_swap=always), [])
    engine = Engine.with_scheduler(model, "continuous", num_blocks=20)
    assert isinstance(engine.runner, PagedRunner) and engine.runner.host is not None
    assert engine.runner.host.blocks.shape[1] == model.args.n_layers  # one pool per layer, not two
    outs, _ = run(engine, reqs)
    assert outs == want and sum(engine.requests_swapped.values()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_swaps_through_pinned_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA: the swap copies are pinned and asynchronous, the decode is the captured Triton
    one; every request still decodes what it decodes alone."""
    paged16 = {"name": "paged", "options": {"block_size": 16}}
    model = AutoModel.from_pretrained("dsr1-tiny", device="cuda", kvcache=paged16, scheduler="continuous")
    reference = AutoModel.from_pretrained("dsr1-tiny", device="cuda")
    reqs = [(p * 3, n * 2) for p, n in trace(6, 10)]  # long enough to span several 16-token blocks
    want = [alone(reference, p, n) for p, n in reqs]
    with_policy(monkeypatch, model, SwapPolicy(host_bytes=200 * per_block(model, 16), should_swap=always,
                                               pin=True), [])
    engine = Engine.with_scheduler(model, "continuous", num_blocks=24)
    host = engine.runner.host
    assert host is not None and host.pin and host.blocks.is_pinned()
    outs, _ = run(engine, reqs)
    assert outs == want and sum(engine.requests_swapped.values()) > 0


# --- the pieces alone ----------------------------------------------------------------------

def _request(rid: str, n: int) -> Request:
    return Request(request_id=rid, prompt_ids=list(range(10, 10 + n)), max_tokens=4)


def test_block_manager_swaps_out_and_back_in() -> None:
    asked: list[int] = []

    def should_swap(n: int) -> bool:
        asked.append(n)
        return n >= 8

    blocks = BlockManager(6, 4, swap=SwapSpace(3, should_swap))
    a, b = _request("a", 10), _request("b", 5)
    for r in (a, b):
        assert blocks.allocate(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens - 1  # all but the last, as after a step
    assert not blocks.preempt(b) and not b.swapped  # 4 tokens: the policy says recompute
    assert blocks.preempt(a) and a.swapped and not a.block_ids and a.num_computed_tokens == 0
    assert asked == [4, 9] and a.num_swapped_tokens == 9 and len(a.host_block_ids) == 3
    blocks.check()
    out, into, swapped = blocks.take_swaps()
    assert len(out) == 3 and into == () and swapped == ("a",)
    assert blocks.cached_tokens(a) == 9
    assert blocks.allocate(a, 10) and a.num_computed_tokens == 9 and not a.swapped
    out, into, swapped = blocks.take_swaps()
    assert out == () and [d for _, d in into] == a.block_ids and swapped == ()
    blocks.check()
    blocks.free(a)
    blocks.check()
    assert blocks.num_free() == 6 and blocks.swap is not None and blocks.swap.num_free() == 3


def test_aborting_a_swapped_request_frees_its_host_blocks() -> None:
    blocks = BlockManager(4, 4, swap=SwapSpace(4, lambda n: True))
    r = _request("r", 7)
    assert blocks.allocate(r, 7)
    r.num_computed_tokens = 6
    assert blocks.preempt(r)
    blocks.take_swaps()
    blocks.free(r)  # what the scheduler's abort does
    blocks.check()
    assert not r.swapped and blocks.swap is not None and blocks.swap.num_free() == 4


def test_a_host_block_read_this_step_is_not_overwritten_this_step() -> None:
    """A swap-in's host blocks become free only once its plan is out; a block a swap-in of this
    plan fills has nothing to save yet (the copies run out first, then in)."""
    blocks = BlockManager(4, 4, swap=SwapSpace(2, lambda n: True))
    a, b = _request("a", 5), _request("b", 5)
    assert blocks.allocate(a, 5)
    a.num_computed_tokens = 4
    assert blocks.preempt(a)
    blocks.take_swaps()
    assert blocks.allocate(a, 5)  # swap-in queued: a's one host block is read in the next plan
    assert blocks.allocate(b, 5)
    b.num_computed_tokens = 4
    assert blocks.preempt(b)  # the other host block: a's is not free yet
    a.num_computed_tokens = 4
    assert not blocks.preempt(a)  # its block is still to be filled by this plan's swap-in: recompute
    out, into, swapped = blocks.take_swaps()
    assert {h for _, h in out}.isdisjoint({h for h, _ in into}) and swapped == ("b",)
    blocks.check()


@pytest.mark.parametrize("shared", [False, True])
def test_host_kv_round_trip(shared: bool) -> None:
    torch.manual_seed(0)
    kv = PagedKV(2, 9, 4, 2, 8, torch.float32, torch.device("cpu"), shared=shared)
    for t in (*kv.k, *kv.v):
        t.normal_()
    before = [t.clone() for t in (*kv.k, *kv.v)]
    host = HostKV(kv, 5, pin=True)  # pinning asked on a CPU pool: nothing to pin for
    assert not host.pin and host.blocks.shape == (5, 2 if shared else 4, 4, 2, 8)
    host.apply([(1, 3), (4, 4), (7, 0)], [])  # runs 3-4 and 0: two copies
    for t in (*kv.k, *kv.v):
        t.zero_()
    host.apply([], [(3, 2), (4, 8), (0, 5)])
    for got, old in zip((*kv.k, *kv.v), before):
        torch.testing.assert_close(got[[2, 8, 5]], old[[1, 4, 7]], atol=0, rtol=0)
        assert not got[[0, 1, 3, 4, 6, 7]].any()


def test_engine_refuses_a_plan_without_the_swap_copies(
        paged: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsr1.errors import Dsr1Error

    with_policy(monkeypatch, paged, SwapPolicy(host_bytes=50 * per_block(paged), should_swap=always), [])
    engine = Engine.with_scheduler(paged, "continuous", num_blocks=24)
    plain: Callable[[Any, Any, Any], SchedulerOutput] = lambda s, p, f: SchedulerOutput(tuple(s), tuple(p), f)
    monkeypatch.setattr(engine.scheduler, "output", plain)  # a scheduler that builds its plans itself
    reqs = trace(4, 10)
    for p, n in reqs:
        engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
    with pytest.raises(Dsr1Error, match="does not carry the copies"):
        while engine.has_unfinished():
            engine.step()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prefix_caching=st.booleans())
def test_random_swaps_keep_every_request_reading_its_own_kv(seed: int, prefix_caching: bool) -> None:
    """Random preemptions, readmissions and aborts over a simulated pool: each slot holds the
    prefix whose key it is, plans' copies run out then in before the step's writes, and every
    running request's computed tokens always read back as its own."""
    rng = random.Random(seed)
    bs = 4
    blocks = BlockManager(10, bs, prefix_caching=prefix_caching,
                          swap=SwapSpace(rng.randint(1, 8), lambda n: rng.random() < 0.8))
    device: list[list[tuple[int, ...] | None]] = [[None] * bs for _ in range(10)]
    host: list[list[tuple[int, ...] | None]] = [[None] * bs for _ in range(8)]
    stem = [rng.randrange(5) for _ in range(8)]  # shared prompt heads: prefix-cache hits
    waiting = [Request(str(i), stem[: rng.randint(0, 8)] + [rng.randrange(5) for _ in range(rng.randint(1, 9))], 8)
               for i in range(8)]
    running: list[Request] = []
    for _ in range(60):
        if running and rng.random() < 0.3:  # preempt the newest, as the continuous scheduler does
            victim = running.pop()
            blocks.preempt(victim)
            waiting.insert(0, victim)
        elif waiting and rng.random() < 0.1:  # abort a waiting (maybe swapped) request
            blocks.free(waiting.pop(rng.randrange(len(waiting))))
        plan: list[tuple[Request, int]] = []
        if waiting and rng.random() < 0.6:
            r = waiting[0]
            start = blocks.cached_tokens(r)
            n = min(r.num_tokens - start, rng.randint(1, 6))
            if blocks.allocate(r, start + n):
                assert r.num_computed_tokens == start
                running.append(waiting.pop(0))
                plan.append((r, n))
        for r in running:
            if r.num_tokens == r.num_computed_tokens:
                r.output_ids.append(rng.randrange(5))  # last step's sample
            if not any(p is r for p, _ in plan) and blocks.allocate(r, r.num_computed_tokens + 1):
                plan.append((r, 1))
        out, into, _ = blocks.take_swaps()
        for d, h in out:
            host[h] = list(device[d])
        for h, d in into:
            device[d] = list(host[h])
        for r, n in plan:  # the forwards write each new token's slot
            ids = r.all_ids
            for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
                device[r.block_ids[p // bs]][p % bs] = tuple(ids[: p + 1])
            r.num_computed_tokens += n
            blocks.commit(r)
        for r in list(running):
            ids = r.all_ids
            for p in range(r.num_computed_tokens):
                assert device[r.block_ids[p // bs]][p % bs] == tuple(ids[: p + 1]), (r.request_id, p)
            if len(r.output_ids) >= r.max_tokens or rng.random() < 0.05:
                running.remove(r)
                blocks.free(r)
        blocks.check()

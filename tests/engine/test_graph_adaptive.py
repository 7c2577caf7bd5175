"""Graph ``adaptive``: the choice per (batch, context) bucket, failures, drift, the plan cache, and
real generates that decode exactly what eager decodes.

The choice logic runs against a fake timer that returns scripted latencies per (plan, bucket)
and fake candidates whose steps say which one ran, so what is tested is the logic, never a
timing. The end-to-end tests use the real timer and check only tokens and what was recorded.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.config import PluginChoice, fusion_choice, load_config
from dsr1.graph.adaptive import (
    BASELINE_STEPS,
    PLANS,
    AdaptiveOptions,
    AdaptiveSteps,
    BucketStep,
    Candidate,
    Planner,
    fastest,
)
from dsr1.graph.candidates import with_kernel
from dsr1.graph.plan_cache import PlanCache
from dsr1_sdk.testing import GraphConformance

#: scripted step latencies (invented, not measurements) shaped like what issue 16 reports for the
#: H200: the compiled + captured step wins at batch 1 and loses to plain capture from batch 8 up.
H200_LIKE: dict[str, dict[int, float]] = {
    "eager": {1: 20e-3, 8: 24e-3, 32: 30e-3, 128: 60e-3},
    "compile": {1: 6.0e-3, 8: 9.0e-3, 32: 25e-3, 128: 51e-3},
    "cudagraph": {1: 5.2e-3, 8: 5.6e-3, 32: 6.5e-3, 128: 8.4e-3},
    "cudagraph+compile": {1: 4.6e-3, 8: 6.1e-3, 32: 12e-3, 128: 51e-3},
}
CONTEXT = 256


class FakeTimer:
    """Scripted latencies: ``latency(plan, bucket, round)``; ``now()`` walks ``clock``.

    Each measurement runs the candidate's step once, as the real timer does, so a failing
    candidate fails here too."""

    def __init__(self, latency: Callable[[str, tuple[int, int], int], float]) -> None:
        self.latency = latency
        self.measured: list[tuple[str, tuple[int, int]]] = []
        self.rounds: dict[tuple[int, int], int] = {}
        self.clock = 0.0
        self.tick = 1e-3

    def measure(self, plan: str, bucket: tuple[int, int], run: Callable[[], Any], warmup: int, steps: int) -> float:
        run()
        self.measured.append((plan, bucket))
        return self.latency(plan, bucket, self.rounds.get(bucket, 0))

    def now(self) -> float:
        self.clock += self.tick
        return self.clock


def fake_candidates(names: tuple[str, ...] = PLANS, broken: Mapping[str, str] | None = None) -> list[Candidate]:
    """Candidates whose step returns ``(B, 1)`` filled with the candidate's index in :data:`PLANS`."""
    broken = broken or {}
    out = []
    for name in names:
        def bind(model: Any, cache: Any, key_valid: torch.Tensor, name: str = name) -> Callable[..., torch.Tensor]:
            if name in broken:
                raise RuntimeError(broken[name])
            return lambda ids, pos, slot: torch.full((ids.shape[0], 1), float(PLANS.index(name)))
        out.append(Candidate(name, bind))
    return out


def fake_call(steps: AdaptiveSteps, batch: int, context: int = CONTEXT) -> BucketStep:
    model = SimpleNamespace(recurrent=False)
    cache = SimpleNamespace(update_static=object(), capacity=context)
    return steps.runner(model, cache, torch.ones((batch, 8), dtype=torch.bool))  # type: ignore[arg-type]


def ran(step: BucketStep, batch: int) -> str:
    """Run one step; the name of the candidate that computed it."""
    out = step(torch.zeros((batch, 1), dtype=torch.long), torch.zeros((batch, 1), dtype=torch.long), 5)
    return PLANS[int(out[0, 0])]


def h200(plan: str, bucket: tuple[int, int], round_: int) -> float:
    return H200_LIKE[plan][bucket[0]]


def adaptive(timer: FakeTimer, candidates: list[Candidate] | None = None, cache: PlanCache | None = None,
             **options: Any) -> AdaptiveSteps:
    planner = Planner(candidates or fake_candidates(), timer, AdaptiveOptions(**options), cache)
    return AdaptiveSteps(planner, timer)


# --- the choice ----------------------------------------------------------------------------------


def test_choices_for_batch_1_8_32_128_against_a_fake_timer() -> None:
    """The issue's four batch sizes: compiled + captured at 1, plain capture from 8 up."""
    timer = FakeTimer(h200)
    steps = adaptive(timer)
    picked = {b: ran(fake_call(steps, b), b) for b in (1, 8, 32, 128)}
    print("\n" + steps.summary())  # the choices, as the log prints them
    assert picked == {1: "cudagraph+compile", 8: "cudagraph", 32: "cudagraph", 128: "cudagraph"}
    report = steps.report()
    assert [(e["batch"], e["plan"]) for e in report["buckets"]] == list(picked.items())
    assert report["buckets"][0]["latency_s"] == {p: H200_LIKE[p][1] for p in PLANS}
    # each candidate measured once per bucket; the next calls of a bucket run the choice directly
    assert len(timer.measured) == 4 * len(PLANS)
    again = fake_call(steps, 8)
    assert [ran(again, 8) for _ in range(3)] == ["cudagraph"] * 3 and len(timer.measured) == 4 * len(PLANS)


def test_each_bucket_is_its_own_context_too() -> None:
    timer = FakeTimer(lambda plan, bucket, r: {"eager": 2.0, "compile": 1.0 if bucket[1] == 256 else 3.0}[plan])
    steps = adaptive(timer, fake_candidates(("eager", "compile")))
    assert ran(fake_call(steps, 4, 256), 4) == "compile"
    assert ran(fake_call(steps, 4, 512), 4) == "eager"


def test_a_tie_goes_to_the_simpler_plan() -> None:
    assert fastest({"cudagraph": 1.0, "eager": 1.0, "compile": 2.0}, PLANS) == "eager"


def test_a_failing_candidate_is_excluded_with_a_one_line_warning() -> None:
    timer = FakeTimer(h200)
    cands = fake_candidates(broken={"cudagraph+compile": "capture failed: operation not permitted\nmore detail"})
    steps = adaptive(timer, cands)
    with pytest.warns(UserWarning) as caught:
        assert ran(fake_call(steps, 1), 1) == "cudagraph"  # the next best at batch 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("graph adaptive: candidate 'cudagraph+compile' failed at batch 1, context 256 "
                                  "(RuntimeError: capture failed: operation not permitted); excluded")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded for good: not tried (nor warned about) again
        assert ran(fake_call(steps, 8), 8) == "cudagraph"
    assert ("cudagraph+compile", (8, CONTEXT)) not in timer.measured
    assert steps.report()["excluded"] == {"cudagraph+compile": "RuntimeError: capture failed: operation not permitted"}


def test_when_every_candidate_fails_the_error_is_raised() -> None:
    steps = adaptive(FakeTimer(h200), fake_candidates(("eager",), broken={"eager": "boom"}))
    with pytest.raises(RuntimeError, match="boom"):
        ran(fake_call(steps, 1), 1)


def test_drift_re_plans_after_the_set_number_of_steps() -> None:
    """After the choice the calls are timed; ``drift_steps`` in a row more than ``drift_fraction``
    off the baseline measure the plans again, and the new fastest runs."""
    timer = FakeTimer(lambda plan, bucket, r: {"eager": 2.0, "compile": 1.0 if r == 0 else 3.0}[plan])
    steps = adaptive(timer, fake_candidates(("eager", "compile")), drift_fraction=0.5, drift_steps=4)
    call = fake_call(steps, 2)
    assert ran(call, 2) == "compile"
    for _ in range(BASELINE_STEPS + 1):  # the first call after the choice only stamps; then the baseline
        assert ran(call, 2) == "compile"
    timer.tick = 1.4e-3  # 40% off: within the fraction, never a re-plan
    for _ in range(10):
        assert ran(call, 2) == "compile"
    timer.tick = 2e-3  # 100% off
    for _ in range(3):
        assert ran(call, 2) == "compile"
    timer.tick = 1e-3  # back in band: the count starts again
    assert ran(call, 2) == "compile"
    timer.tick = 2e-3
    timer.rounds[(2, CONTEXT)] = 1  # what the second trial will measure
    for _ in range(4):
        assert ran(call, 2) == "compile"  # the fourth call off the baseline marks the bucket
    n = len(timer.measured)
    assert ran(call, 2) == "eager"  # measured again, eager is now the faster
    assert len(timer.measured) == n + 2 and steps.report()["buckets"][0]["replans"] == 1


# --- the plan cache --------------------------------------------------------------------------------


KEY = {"model": "m1", "device": "cpu:test", "config": "c1"}


def test_a_second_start_reads_the_plans_and_skips_the_trials(tmp_path: Path) -> None:
    first = FakeTimer(h200)
    ran(fake_call(adaptive(first, cache=PlanCache(tmp_path, KEY)), 8), 8)
    assert len(first.measured) == len(PLANS)
    second = FakeTimer(h200)
    steps = adaptive(second, cache=PlanCache(tmp_path, KEY))
    assert ran(fake_call(steps, 8), 8) == "cudagraph" and second.measured == []
    assert steps.report()["buckets"][0]["source"] == "cache"
    assert ran(fake_call(steps, 1), 1) == "cudagraph+compile" and len(second.measured) == len(PLANS)
    saved = json.loads(PlanCache(tmp_path, KEY).path.read_text())
    assert {k: v["plan"] for k, v in saved["plans"].items()} == {"8x256": "cudagraph", "1x256": "cudagraph+compile"}


@pytest.mark.parametrize(("damage", "warning"), [
    (lambda d: "{not json", "is corrupt"),
    (lambda d: json.dumps([1, 2]), "is corrupt"),
    (lambda d: json.dumps({**d, "key": {**d["key"], "torch": "1.0.0"}}), "was written for another torch"),
    (lambda d: json.dumps({**d, "key": {**d["key"], "model": "other"}}), "was written for another model"),
], ids=["corrupt", "not_a_table", "other_torch", "other_model"])
def test_a_cache_file_that_does_not_fit_is_ignored_and_rebuilt(
        tmp_path: Path, damage: Callable[[dict[str, Any]], str], warning: str) -> None:
    cache = PlanCache(tmp_path, KEY)
    ran(fake_call(adaptive(FakeTimer(h200), cache=cache), 8), 8)
    neighbour = tmp_path / "someone-else.json"
    neighbour.write_text("untouched")
    cache.path.write_text(damage(json.loads(cache.path.read_text())))
    timer = FakeTimer(h200)
    with pytest.warns(UserWarning, match=f"graph adaptive: plan cache .* {warning}.*: ignored") as caught:
        steps = adaptive(timer, cache=PlanCache(tmp_path, KEY))
    assert all("\n" not in str(w.message) for w in caught)
    assert ran(fake_call(steps, 8), 8) == "cudagraph" and len(timer.measured) == len(PLANS)  # measured again
    rebuilt = json.loads(cache.path.read_text())
    assert rebuilt["key"] == cache.key and set(rebuilt["plans"]) == {"8x256"}
    assert neighbour.read_text() == "untouched" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [cache.path.name, neighbour.name])  # no temporary file left behind


def test_a_cached_plan_that_now_fails_is_excluded_and_measured_again(tmp_path: Path) -> None:
    ran(fake_call(adaptive(FakeTimer(h200), cache=PlanCache(tmp_path, KEY)), 8), 8)  # cudagraph cached
    timer = FakeTimer(h200)
    steps = adaptive(timer, fake_candidates(broken={"cudagraph": "no graphs today"}), cache=PlanCache(tmp_path, KEY))
    with pytest.warns(UserWarning, match="candidate 'cudagraph' failed"):
        picked = ran(fake_call(steps, 8), 8)
    assert picked == "cudagraph+compile"  # the next best at batch 8


# --- kernel choices of the quant plugin -------------------------------------------------------------


def test_quant_kernel_choices_multiply_the_candidates() -> None:
    class Quant:
        def __init__(self) -> None:
            self.used: list[str] = []

        def kernel_choices(self, device: Any) -> list[str]:
            return ["triton", "int8pack"]

        def use_kernel_(self, model: Any, kernel: str) -> None:
            self.used.append(kernel)

    quant = Quant()
    kernels = quant.kernel_choices(None)
    cands = [with_kernel(c, quant, k) for k in kernels for c in fake_candidates(("eager", "cudagraph"))]
    assert [c.name for c in cands] == ["eager[triton]", "cudagraph[triton]", "eager[int8pack]", "cudagraph[int8pack]"]
    timer = FakeTimer(lambda plan, bucket, r: {"cudagraph[int8pack]": 1.0}.get(plan, 2.0))
    steps = AdaptiveSteps(Planner(cands, timer, AdaptiveOptions()), timer)
    call = fake_call(steps, 4)
    assert ran(call, 4) == "cudagraph" and steps.report()["buckets"][0]["plan"] == "cudagraph[int8pack]"
    assert quant.used[-1] == "int8pack"  # the winner's kernel is the one left in place


# --- config ----------------------------------------------------------------------------------------


def test_tiling_auto_with_kernel_fusion_means_adaptive() -> None:
    assert fusion_choice("cuda", "auto") == PluginChoice(name="adaptive", options={"tiling_strategy": "auto"})
    assert fusion_choice("cpu", "auto", True) == PluginChoice(
        name="adaptive", options={"tiling_strategy": "auto", "fallback": True})
    assert fusion_choice("cuda", "fixed").name == "cudagraph" and fusion_choice("cpu", "fixed").name == "compile"
    cfg = load_config({"hardware": {"type": "nvidia", "optimizer": {"kernel_fusion": True, "tiling_strategy": "auto"}}})
    assert cfg.choice("graph") == PluginChoice(name="adaptive", options={"tiling_strategy": "auto"})


# --- real generates ------------------------------------------------------------------------------


class TestAdaptiveKit(GraphConformance):
    """The SDK's graph kit (greedy and seeded sampling, twice, the model left as it was); eager as
    the only candidate, so inductor does not compile on the suite's CPU."""

    plugin = "adaptive"
    options = {"candidates": ["eager"], "plan_cache": False}


def test_adaptive_generate_on_cpu_matches_eager(ckpts: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real timer and candidates (eager, and compile with dynamo's ``eager`` backend: fast);
    a padded batch decodes exactly what the eager pass decodes, the choice is recorded on the
    monitor and reported, and a second start reads it from the plan cache."""
    monkeypatch.setenv("DSR1_HOME", str(tmp_path))  # a plan cache of this test's own
    graph = {"name": "adaptive", "options": {"trial_steps": 2, "warmup_steps": 1}}
    eager = AutoModel.from_pretrained(ckpts["llama"])
    model = AutoModel.from_pretrained(ckpts["llama"], graph=graph, device="engine-test-device")
    assert model.compile_kwargs["backend"] == "eager"
    ids = torch.tensor([[0, 0, 5, 17, 33, 41], [3, 9, 12, 44, 45, 46]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    torch._dynamo.reset()
    try:
        want = eager.generate(ids, mask, max_new_tokens=8, ignore_eos=True)
        assert torch.equal(model.generate(ids, mask, max_new_tokens=8, ignore_eos=True), want)
        assert torch.equal(model.generate(ids[:1], mask[:1], max_new_tokens=8, ignore_eos=True), want[:1])
        report = model.runtime.steps.report()
        assert report["candidates"] == ["eager", "compile"] and report["excluded"] == {}
        assert [(e["batch"], e["source"]) for e in report["buckets"]] == [(1, "trial"), (2, "trial")]
        assert all(e["plan"] in ("eager", "compile") and set(e["latency_s"]) == {"eager", "compile"}
                   for e in report["buckets"])
        recorded = [e for e in model.pipeline.monitor.stream() if e["event"] == "graph.plan"]
        assert sorted((e["batch"], e["plan"]) for e in recorded) == [(e["batch"], e["plan"]) for e in report["buckets"]]
        again = AutoModel.from_pretrained(ckpts["llama"], graph=graph, device="engine-test-device")
        assert torch.equal(again.generate(ids, mask, max_new_tokens=8, ignore_eos=True), want)
        assert [(e["batch"], e["source"]) for e in again.runtime.steps.report()["buckets"]] == [(2, "cache")]
    finally:
        torch._dynamo.reset()


def test_a_cache_without_static_slots_runs_eagerly_untried(ckpts: dict[str, Path]) -> None:
    eager = AutoModel.from_pretrained(ckpts["llama"], kvcache="int8")
    model = AutoModel.from_pretrained(ckpts["llama"], kvcache="int8",
                                      graph={"name": "adaptive", "options": {"candidates": ["eager"]}})
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    assert torch.equal(model.generate(ids, max_new_tokens=6, ignore_eos=True),
                       eager.generate(ids, max_new_tokens=6, ignore_eos=True))
    (entry,) = model.runtime.steps.report()["buckets"]
    assert entry["plan"] == "eager" and entry["source"] == "fixed" and "no static slots" in entry["note"]


def test_captured_candidates_need_cuda(ckpts: dict[str, Path]) -> None:
    from dsr1.errors import Dsr1Error

    with pytest.raises(Dsr1Error, match="candidate 'cudagraph' cannot run here"):
        AutoModel.from_pretrained(ckpts["llama"], graph={"name": "adaptive", "options": {"candidates": ["cudagraph"]}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the captured candidates need a CUDA device")
def test_adaptive_generate_on_cuda_matches_eager(ckpts: dict[str, Path]) -> None:
    """All four plans tried for real (inductor compiles here), tokens as eager's, at two batch sizes."""
    eager = AutoModel.from_pretrained(ckpts["llama"], device="cuda")
    model = AutoModel.from_pretrained(ckpts["llama"], device="cuda", graph="adaptive")
    ids = torch.tensor([[1, 40, 41, 42, 43], [0, 0, 7, 8, 9]], device="cuda")
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], device="cuda")
    torch._dynamo.reset()
    try:
        for rows, n in ((1, 12), (2, 12), (2, 30)):  # the last call reuses batch 2's choice
            assert torch.equal(model.generate(ids[:rows], mask[:rows], max_new_tokens=n, ignore_eos=True),
                               eager.generate(ids[:rows], mask[:rows], max_new_tokens=n, ignore_eos=True))
        report = model.runtime.steps.report()
        assert report["candidates"] == list(PLANS)
        assert {e["batch"] for e in report["buckets"]} == {1, 2}
        print("\n" + model.decode_graphs.summary())
    finally:
        torch._dynamo.reset()


def test_a_cuda_device_offers_the_four_plans(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """What apply builds on a CUDA device, checked without one: the four plans, the compiled ones
    with the device's backend, the captured ones as graph 'cudagraph' builds them."""
    from dsr1.graph.adaptive import AdaptiveGraph
    from dsr1.graph.cudagraph import DecodeGraphs

    class CudaLike:
        torch_device_type = "cuda"

        def compile_backend(self) -> tuple[str, dict[str, Any]]:
            return "eager", {}

        def autotune_settings(self, strategy: str) -> dict[str, Any]:
            return {}

    monkeypatch.setattr(torch.cuda, "MemPool", lambda: SimpleNamespace(id=(0, 0)))  # no pool without CUDA
    model = AutoModel.from_pretrained(ckpts["llama"])
    steps = AdaptiveGraph(AdaptiveOptions(plan_cache=False)).apply(model, CudaLike())  # type: ignore[arg-type]
    planner = steps.decode_graphs.planner
    assert planner.order == list(PLANS) and steps.compile_kwargs["backend"] == "eager"
    graphs = [c.graphs for c in planner.candidates.values() if c.graphs is not None]
    assert all(isinstance(g, DecodeGraphs) and g.capture for g in graphs)
    assert [g.compiled is not None for g in graphs] == [False, True]
    assert graphs[1].compiled_max_batch >= 1 << 20  # adaptive decides which batches run compiled, not a threshold
    only = AdaptiveGraph(AdaptiveOptions(candidates=["eager", "cudagraph"], plan_cache=False))
    assert only.offered(CudaLike(), model) == ["eager", "cudagraph"]  # type: ignore[arg-type]

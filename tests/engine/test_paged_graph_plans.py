"""The graph pass decides how the paged engine's static decode step runs per batch bucket
(dsr1.graph.paged_plans): fixed by eager / compile / cudagraph, measured by adaptive. The
measuring runs against a fake timer; the tokens are checked against the model run alone."""
from __future__ import annotations

import collections
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.engine import Engine
from dsr1.engine.paged import decode_reference
from dsr1.engine.runner import PagedRunner, paged_plans
from dsr1.graph.adaptive import AdaptiveOptions, Candidate, Planner
from dsr1.graph.paged_plans import FixedPaged, MeasuredPaged
from dsr1.interfaces import SamplingParams


class FakeTimer:
    """Runs each trial once (as the real timer runs it) and returns ``latency(plan, rows)``."""

    def __init__(self, latency: Callable[[str, int], float]) -> None:
        self.latency = latency
        self.measured: list[tuple[str, int]] = []

    def measure(self, plan: str, bucket: tuple[int, int], run: Callable[[], Any], warmup: int, steps: int) -> float:
        run()
        self.measured.append((plan, bucket[0]))
        return self.latency(plan, bucket[0])

    def now(self) -> float:
        return 0.0


def _engine(chooser: Any) -> Engine:
    engine = Engine.from_pretrained("dsr1-tiny", kvcache={"name": "paged", "options": {"block_size": 16}})
    engine.runner = PagedRunner(engine.model, engine.runner.decoder, engine.num_blocks, 16, engine.max_model_len,
                                decode_kernel=decode_reference, capture=False)
    decode = engine.runner.static_decode
    assert decode is not None
    decode.chooser = chooser
    return engine


def test_adaptive_measures_each_bucket_once_and_runs_its_choice() -> None:
    # "compile" is the fastest at one row, eager from two up; the compiled step is the model's own,
    # counted, so the test sees which buckets ran it without compiling anything
    timer = FakeTimer(lambda plan, rows: {"eager": 2.0, "compile": 1.0 if rows == 1 else 3.0}[plan])
    planner = Planner([Candidate("eager", lambda *a: None), Candidate("compile", lambda *a: None)], timer,
                      AdaptiveOptions(plan_cache=False), None)
    engine = _engine(MeasuredPaged(planner))
    decode = engine.runner.static_decode
    assert decode is not None
    compiled_rows: list[int] = []
    forward = engine.model.forward_step

    def counted(ids: torch.Tensor, *rest: Any) -> torch.Tensor:
        compiled_rows.append(ids.shape[0])
        return forward(ids, *rest)

    decode._compiled = counted
    rng = random.Random(5)
    reqs = [([rng.randrange(10, 2000) for _ in range(rng.randint(3, 30))], rng.randint(3, 12)) for _ in range(5)]
    alone = [engine.generate([p], [SamplingParams(max_tokens=n, ignore_eos=True)])[0].output_ids for p, n in reqs]
    together = engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs])
    # trials repeat a step on its real rows: the pool is left as one step leaves it
    assert [o.output_ids for o in together] == alone
    chosen = {b["batch"]: b["plan"] for b in planner.report()["buckets"]}
    assert chosen[1] == "compile" and all(plan == "eager" for rows, plan in chosen.items() if rows > 1), chosen
    assert decode.buckets[1].plan == "compile"
    per_bucket = [rows for _, rows in timer.measured]
    assert sorted(set(per_bucket)) == sorted(chosen) and len(per_bucket) == 2 * len(chosen)  # each bucket once
    runs = collections.Counter(compiled_rows)  # each bucket's trial ran it once; only the one-row bucket after
    assert runs[1] > 1 and all(n == 1 for rows, n in runs.items() if rows > 1), runs


def test_fixed_passes_name_one_plan_and_cudagraph_stops_compiling_above_its_batch() -> None:
    fixed = FixedPaged("cudagraph+compile", compile_max_batch=4)
    never = lambda plan: (lambda: pytest.fail("a fixed plan measures nothing"))  # noqa: E731
    assert [fixed(n, never) for n in (1, 4, 8)] == ["cudagraph+compile", "cudagraph+compile", "cudagraph"]
    assert FixedPaged("compile", 1)(2, never) == "eager" and FixedPaged("eager")(64, never) == "eager"


@pytest.mark.parametrize("graph, want", [(None, None), ("eager", "eager"),
                                         ({"name": "cudagraph", "options": {"capture": False}}, "eager")])
def test_the_config_s_graph_pass_reaches_the_paged_runner(graph: Any, want: str | None) -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", **({} if graph is None else {"graph": graph}))
    chooser, _ = paged_plans(model)
    # no graph in the config: the runner's own default (captured on CUDA); a named pass decides
    assert (chooser if chooser is None else chooser(8, lambda plan: lambda: None)) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton paged kernel need CUDA")
def test_adaptive_on_cuda_measures_captured_and_compiled_plans_and_decodes_the_same(tmp_path: Any,
                                                                                  monkeypatch: Any) -> None:
    monkeypatch.setenv("DSR1_HOME", str(tmp_path))
    rng = random.Random(7)
    reqs = [([rng.randrange(10, 2000) for _ in range(rng.randint(3, 60))], rng.randint(2, 24)) for _ in range(9)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs]
    outs = {}
    adaptive = {"name": "adaptive", "options": {"candidates": ["eager", "cudagraph", "cudagraph+compile"]}}
    for graph in ("eager", adaptive):
        model = AutoModel.from_pretrained("dsr1-tiny", dtype=torch.float32, device="cuda", kvcache="paged",
                                          scheduler="continuous", graph=graph)
        engine = Engine(model)
        name = "eager" if graph == "eager" else "adaptive"
        outs[name] = [o.output_ids for o in engine.generate([p for p, _ in reqs], params)]
        decode = engine.runner.static_decode
        assert decode is not None
        plans = {size: b.plan for size, b in decode.buckets.items()}
        if name == "eager":
            assert set(plans.values()) == {"eager"} and not any(b.graphs for b in decode.buckets.values())
        else:
            report = model.runtime.steps.report()["paged"]
            assert {b["batch"]: b["plan"] for b in report["buckets"]} == plans
            assert all(set(b["latency_s"]) >= {"eager", "cudagraph"} for b in report["buckets"]), report
    assert outs["adaptive"] == outs["eager"]  # fp32: every plan computes the same tokens

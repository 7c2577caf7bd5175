"""``model.generate`` on the engine loop's batch runner, and the model's one runtime object.

The parity of ``generate`` itself is test_generation / test_parity / test_decode_graph; these
check what is new: the run-ahead decode step (CUDA's, forced here on the CPU) changes no token,
the engine drives a static batch through its public API, and nothing is attached to the model.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

import dsr1.engine.generate as engine_generate
from dsr1.auto import AutoModel
from dsr1.engine.batch_runner import BatchRunner
from dsr1.engine.engine import Engine
from dsr1.interfaces import GraphSteps, SamplingParams
from dsr1.models.common import ModelRuntime

IDS = torch.tensor([[0, 0, 0, 5, 17, 33], [3, 9, 12, 44, 45, 46], [0, 7, 8, 9, 10, 11]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def model(ckpts: dict[str, Path]) -> Any:
    return AutoModel.from_pretrained(ckpts["llama"])


CASES = {
    "greedy, no eos": dict(max_new_tokens=12, ignore_eos=True),
    "rows end early on eos": dict(max_new_tokens=12),  # eos set per test from row 0's own tokens
    "sampled, seeded": dict(max_new_tokens=10, do_sample=True, temperature=1.2, top_k=20, seed=3, ignore_eos=True),
    "sampled, eos": dict(max_new_tokens=10, do_sample=True, temperature=1.5, seed=11),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_ahead_changes_no_token(model: Any, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step launched before the previous ids are read (CUDA's overlap) gives exactly the
    tokens of the step-by-step path, also when rows finish while it runs (their id becomes pad)."""
    kw: dict[str, Any] = dict(CASES[case])
    if not kw.get("ignore_eos"):
        free = model.generate(IDS, MASK, **{**kw, "ignore_eos": True})
        kw.update(eos_token_id=[int(free[0, 8]), int(free[2, 10])], pad_token_id=1)  # rows 0 and 2 stop early
    fed: list[torch.Tensor] = []  # the batch's token buffer as the runner closes it: what each row was fed
    close = BatchRunner.close

    def recording_close(self: BatchRunner) -> None:
        if self.batch is not None:
            fed.append(self.batch.out[:, : self.batch.cur + 1].clone())
        close(self)

    monkeypatch.setattr(BatchRunner, "close", recording_close)
    want = model.generate(IDS, MASK, **kw)
    monkeypatch.setattr(engine_generate, "BatchRunner", functools.partial(BatchRunner, run_ahead=True))
    got = model.generate(IDS, MASK, **kw)
    assert torch.equal(got, want)
    assert len(fed) == 2 and torch.equal(fed[1], fed[0])  # finished rows were fed the pad id, as step by step
    if not kw.get("ignore_eos"):
        assert (got[0, 9:] == 1).all() and got.shape[1] > 9  # row 0 ended on its eos, padded after


def test_one_record_per_batch_and_no_step_events(model: Any) -> None:
    monitor = model.pipeline.monitor
    before = list(monitor.stream())
    model.generate(IDS, MASK, max_new_tokens=6, ignore_eos=True)
    events = [e["event"] for e in list(monitor.stream())[len(before):]]
    assert events == ["prefill", "decode", "kvcache.bytes"]


def test_engine_api_runs_static_batches_on_the_contiguous_cache(model: Any) -> None:
    """kvcache 'contiguous' + scheduler 'static' (the defaults): the engine picks the batch runner;
    each request samples with its own params and seed, as alone."""
    engine = Engine(model)
    assert isinstance(engine.runner, BatchRunner)
    prompts = [[5, 17, 33], [3, 9, 12, 44, 45, 46], [7, 8]]
    params = [SamplingParams(max_tokens=7, ignore_eos=True),
              SamplingParams(max_tokens=5, do_sample=True, temperature=1.3, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)]
    together = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = Engine(model).generate([prompt], [p])[0]
        assert out.output_ids == alone.output_ids and len(out.output_ids) == p.max_tokens
        assert out.finish_reason == "length"
    assert together[2].logprobs is not None and len(together[2].logprobs) == 6
    assert all(len(top) == 2 and lp <= 0 for lp, top in together[2].logprobs)
    assert engine.blocks.num_free() == engine.num_blocks and not engine.has_unfinished()


def test_an_error_mid_batch_leaves_the_model_usable(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    want = model.generate(IDS, MASK, max_new_tokens=5, ignore_eos=True)
    real = model.forward_step
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(IDS, MASK, max_new_tokens=5, ignore_eos=True)
    monkeypatch.undo()
    assert torch.equal(model.generate(IDS, MASK, max_new_tokens=5, ignore_eos=True), want)


def test_runtime_is_one_typed_object_not_attributes(model: Any) -> None:
    assert isinstance(model.runtime, ModelRuntime) and isinstance(model.runtime.steps, GraphSteps)
    attached = {"pipeline", "tokenizer", "source_dir", "generation_defaults", "compiled_step", "decode_graphs",
                "compile_kwargs", "run_lock"} & set(vars(model))
    assert not attached
    assert model.pipeline is model.runtime.pipeline and model.tokenizer is model.runtime.tokenizer
    with pytest.raises(AttributeError):
        model.tokenizer = None  # read-only: set model.runtime.tokenizer
    assert model.compiled_step is None and model.decode_graphs is None


def test_graph_passes_return_steps_and_the_old_form_still_loads(model: Any) -> None:
    from dsr1.graph.eager import EagerGraph
    from dsr1.interfaces import GraphPass
    from dsr1.models.loading import finish_model

    from dsr1.graph.paged_plans import FixedPaged

    assert EagerGraph().apply(model, model.pipeline.device) == GraphSteps(paged=FixedPaged("eager"))

    class InPlace(GraphPass):  # the older form: returns the model itself
        def apply(self, m: Any, device: Any) -> Any:
            return m

    pipeline = model.pipeline
    saved = pipeline.graph
    try:
        pipeline.graph = InPlace()
        finished = finish_model(model, pipeline)
    finally:
        pipeline.graph = saved
    assert finished is model and model.runtime.steps == GraphSteps()

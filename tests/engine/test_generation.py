"""The generate loop and the builtin plugins it drives (kvcache, decoding, scheduler, monitor, graph)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.auto import AutoModel
from dsr1.decoding.sampling import SamplingDecoder, top_k_filter, top_p_filter
from dsr1.errors import Dsr1Error
from dsr1.interfaces import CacheShape, Request, SamplingParams
from dsr1.kvcache.contiguous import ContiguousKVCache, ContiguousOptions
from dsr1.scheduler.static import StaticOptions, StaticScheduler


@pytest.fixture(scope="module")
def model(ckpts: dict[str, Path]) -> Any:
    return AutoModel.from_pretrained(ckpts["llama"])


def _enc(model: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(model.tokenizer(texts, return_tensors="pt"))


# --- sampling ------------------------------------------------------------------------------------


def test_same_seed_same_output(model: Any) -> None:
    enc = _enc(model, ["The for statement", "A function is"])
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, ignore_eos=True)
    a = model.generate(enc["input_ids"], enc["attention_mask"], seed=7, **kw)
    b = model.generate(enc["input_ids"], enc["attention_mask"], seed=7, **kw)
    c = model.generate(enc["input_ids"], enc["attention_mask"], seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_matches_transformers_processors() -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from dsr1.decoding.sampling import apply_repetition_penalty, warp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    seen = torch.randint(0, 50, (3, 9), generator=g)
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), want)
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.8)):
        want = proc(seen, want)
    got = warp(apply_repetition_penalty(logits, seen, 1.3),
               SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.8))
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 64),
    k=st.integers(1, 70),
    p=st.floats(0.01, 1.0),
    temperature=st.floats(0.05, 3.0),
)
def test_sampled_tokens_are_always_allowed(seed: int, vocab: int, k: int, p: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, vocab, generator=g) * 4
    scaled = logits / temperature
    allowed_k = torch.isfinite(top_k_filter(scaled, k))
    allowed_p = torch.isfinite(top_p_filter(scaled, p))
    # the k largest (plus ties) survive top-k; the most likely token always survives top-p
    assert (allowed_k.sum(-1) >= min(k, vocab)).all()
    assert allowed_p.gather(1, scaled.argmax(-1, keepdim=True)).all()
    probs = scaled.softmax(-1)
    kept_mass = (probs * allowed_p).sum(-1)
    dropped_max = torch.where(allowed_p, torch.zeros_like(probs), probs).amax(-1)
    assert (kept_mass >= p - 1e-5).all() or (allowed_p.sum(-1) == vocab).all()
    assert (dropped_max <= probs.masked_fill(~allowed_p, 2).amin(-1) + 1e-7).all()  # only the least likely go
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=k, top_p=p)
    decoder = SamplingDecoder()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        tok = decoder.next_token(logits, torch.zeros(4, 1, dtype=torch.long), params, gen)
        both = top_p_filter(top_k_filter(scaled, k), p)
        assert torch.isfinite(both.gather(1, tok[:, None])).all()


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer, got -3"),
        (dict(temperature=-0.5, do_sample=True), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(max_new_tokens=200), r"exceeds the model's context of 128 tokens; lower max_new_tokens to at most"),
    ],
)
def test_bad_generate_arguments(model: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(Dsr1Error, match=message):
        model.generate(torch.tensor([[1, 5, 6]]), **kwargs)


def test_bad_prompts(model: Any) -> None:
    with pytest.raises(Dsr1Error, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(Dsr1Error, match="empty prompt: row 1"):
        model.generate(torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(Dsr1Error, match="prompt has 129 tokens, longer than the model's context of 128 tokens"):
        model.generate(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(Dsr1Error, match=r"longer than the model's context of 128 tokens; shorten it \(from Python, "
                                        r"truncation=True"):
        model.tokenizer("word " * 200, return_tensors="pt")
    assert model.tokenizer("word " * 200, return_tensors="pt", truncation=True)["input_ids"].shape == (1, 128)


# --- loop behaviour ----------------------------------------------------------------------------------


def test_padding_does_not_change_a_row(model: Any) -> None:
    enc = _enc(model, ["The Python interpreter", "Lists, tuples and dictionaries are the"])
    batch = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12, ignore_eos=True)
    alone = model.generate(_enc(model, ["The Python interpreter"])["input_ids"], max_new_tokens=12, ignore_eos=True)
    assert torch.equal(batch[0, -12:], alone[0, -12:])


def test_eos_stops_and_pads(model: Any) -> None:
    ids = torch.tensor([[1, 40, 41], [1, 50, 51]])
    free = model.generate(ids, max_new_tokens=10, ignore_eos=True)
    first = int(free[0, 3])
    out = model.generate(ids, max_new_tokens=10, eos_token_id=first, pad_token_id=0)
    assert out[0, 3] == first and (out[0, 4:] == 0).all() or out.shape[1] == 4
    assert model.pipeline.monitor.summary()["decode"]["tokens"] > 0


def test_stop_strings_and_stream(model: Any) -> None:
    enc = _enc(model, ["The Python interpreter"])
    full = model.generate(enc["input_ids"], max_new_tokens=20, ignore_eos=True)
    text = model.tokenizer.decode(full[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    pieces = list(model.generate(enc["input_ids"], max_new_tokens=20, ignore_eos=True, stream=True))
    assert "".join(pieces) == text and len(pieces) > 1
    p = enc["input_ids"].shape[1]
    head = model.tokenizer.decode(full[0, p : p + 5], skip_special_tokens=True)
    stop = head[-2:]
    assert stop
    stopped = model.generate(enc["input_ids"], max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert stopped.shape[1] <= p + 5 and torch.equal(stopped[0], full[0, : stopped.shape[1]])
    assert stop in model.tokenizer.decode(stopped[0, p:], skip_special_tokens=True)
    with pytest.raises(Dsr1Error, match="stream=True takes one prompt"):
        model.generate(torch.tensor([[1, 2], [1, 3]]), stream=True)


def test_step_finished_fires_once_per_batch_and_monitor_records(ckpts: dict[str, Path]) -> None:
    from dsr1.hookspecs import hookimpl
    from dsr1.registry import PluginRegistry

    stats: list[dict[str, Any]] = []

    class Listener:
        @hookimpl
        def dsr1_step_finished(self, stats: dict[str, Any]) -> None:
            seen.append(stats)

    seen = stats
    registry = PluginRegistry()
    registry.pm.register(Listener())
    m = AutoModel.from_pretrained(ckpts["llama"], registry=registry)
    m.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=9, ignore_eos=True)
    assert len(stats) == 1
    assert stats[0]["new_tokens"] == 9 and stats[0]["prompt_tokens"] == 4
    summary = m.pipeline.monitor.summary()
    assert summary["decode"]["count"] == 1 and summary["prefill"]["count"] == 1
    assert summary["kvcache.bytes"]["bytes"] == 2 * 2 * 1 * 2 * 256 * 16 * 4  # K+V, L, B, Hkv, Tcap, D, fp32

    small = AutoModel.from_pretrained(ckpts["llama"], {"scheduler": {"name": "static",
                                                                    "options": {"max_batch_size": 2}}},
                                      registry=registry)
    stats.clear()
    ids = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10]])
    out = small.generate(ids, max_new_tokens=5, ignore_eos=True)
    assert len(stats) == 2  # two scheduler steps: rows (0, 1) then (2,)
    assert torch.equal(out, m.generate(ids, max_new_tokens=5, ignore_eos=True))

    calls = {"n": 0}
    real_step = small.forward_step

    def failing_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # in the first batch's decode, with row 2 still queued
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    small.forward_step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        small.generate(ids, max_new_tokens=5, ignore_eos=True)
    small.forward_step = real_step
    assert not small.pipeline.scheduler.has_pending()  # nothing left over for the next call
    assert torch.equal(small.generate(ids, max_new_tokens=5, ignore_eos=True), out)


def test_kvcache_contiguous_writes_in_place() -> None:
    cache = ContiguousKVCache(ContiguousOptions(granularity=4))
    shape = CacheShape(n_layers=2, batch_size=3, max_len=7, n_kv_heads=2, head_dim=4)  # capacity 8
    cache.allocate(shape, torch.float32, torch.device("cpu"))
    storage = cache.k[1].data_ptr()  # type: ignore[index]
    k = torch.randn(3, 2, 5, 4)
    v = torch.randn(3, 2, 5, 4)
    k_all, v_all = cache.update(1, k, v, 0)
    assert k_all.shape == (3, 2, 5, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    k2 = torch.randn(3, 2, 1, 4)
    k_all, _ = cache.update(1, k2, k2, 5)
    assert k_all.shape == (3, 2, 6, 4) and torch.equal(k_all[:, :, 5:], k2) and torch.equal(k_all[:, :, :5], k)
    assert k_all.data_ptr() == storage  # a view of layer 1's buffer
    assert cache.nbytes() == 2 * 2 * 3 * 2 * 8 * 4 * 4
    cache.allocate(CacheShape(2, 3, 5, 2, 4), torch.float32, torch.device("cpu"))
    assert cache.k[1].data_ptr() == storage  # type: ignore[index]  # fits: buffers reused, same strides
    cache.allocate(CacheShape(2, 3, 9, 2, 4), torch.float32, torch.device("cpu"))
    assert len(cache.k) == 2 and cache.k[1].shape == (3, 2, 12, 4)  # type: ignore[arg-type, index]  # grown, rounded up to 4


def test_static_scheduler_fifo_batches() -> None:
    s = StaticScheduler(StaticOptions(max_batch_size=2))
    for i in range(5):
        s.add(Request(request_id=i, prompt_ids=[1, 2], max_new_tokens=3))
    batches = []
    while s.has_pending():
        batches.append([r.request_id for r in s.next_batch()])
    assert batches == [[0, 1], [2, 3], [4]] and s.next_batch() == []


def test_compile_graph_wires_the_decode_step(ckpts: dict[str, Path]) -> None:
    """graph=compile compiles forward_step with the device's backend (dynamo 'eager' here: fast)."""
    eager = AutoModel.from_pretrained(ckpts["llama"])
    compiled = AutoModel.from_pretrained(ckpts["llama"], graph={"name": "compile", "options": {"mode": None}},
                                         device="engine-test-device")
    assert compiled.compile_kwargs["backend"] == "eager" and hasattr(compiled, "compiled_step")
    ids = torch.tensor([[1, 40, 41, 42]])
    torch._dynamo.reset()
    assert torch.equal(compiled.generate(ids, max_new_tokens=6, ignore_eos=True),
                       eager.generate(ids, max_new_tokens=6, ignore_eos=True))

    from dsr1.graph.compile import CompileOptions, compile_kwargs

    class Dev:
        def compile_backend(self) -> tuple[str, dict[str, Any]]:
            return "inductor", {"freezing": True}

        def autotune_settings(self, strategy: str) -> dict[str, Any]:
            return {"mode": "max-autotune-no-cudagraphs"} if strategy == "auto" else {}

    assert compile_kwargs(CompileOptions(), Dev()) == {"backend": "inductor", "dynamic": None,  # type: ignore[arg-type]
                                                       "options": {"freezing": True}}
    auto = compile_kwargs(CompileOptions(tiling_strategy="auto"), Dev())  # type: ignore[arg-type]
    assert auto["options"]["max_autotune"] is True and auto["options"]["freezing"] is True



def test_compiled_step_compiles_once_for_every_max_new_tokens(ckpts: dict[str, Path]) -> None:
    """The decode step's ids are a copy, not a view of the output buffer (whose row stride is the prompt plus
    max_new_tokens): a generate of another length reuses the compiled step instead of compiling it again."""
    from torch._dynamo.utils import counters

    compiled = AutoModel.from_pretrained(ckpts["llama"], graph={"name": "compile", "options": {"mode": None}},
                                         device="engine-test-device")
    ids = torch.tensor([[1, 40, 41, 42]])
    torch._dynamo.reset()
    counters.clear()
    compiled.generate(ids, max_new_tokens=6, ignore_eos=True)
    first = counters["stats"]["unique_graphs"]
    for n in (9, 4, 12):
        compiled.generate(ids, max_new_tokens=n, ignore_eos=True)
    assert first >= 1 and counters["stats"]["unique_graphs"] == first

def test_compile_with_inductor_on_cpu(ckpts: dict[str, Path]) -> None:
    """The real thing: inductor compiles the tiny model's decode step (~35 s on 2 busy cores)."""
    compiled = AutoModel.from_pretrained(ckpts["llama"], graph="compile")
    assert compiled.compile_kwargs == {"backend": "inductor", "dynamic": None}
    eager = AutoModel.from_pretrained(ckpts["llama"])
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch._dynamo.reset()
    try:
        assert torch.equal(compiled.generate(ids, max_new_tokens=5, ignore_eos=True),
                           eager.generate(ids, max_new_tokens=5, ignore_eos=True))
    finally:
        torch._dynamo.reset()

"""The runner's fast paths against its reference paths, on CPU.

* packed prefill (chunks concatenated, no padding) against :class:`PagedStep` (left-padded,
  host masks): same attention output for every real token, same pool contents;
* the static-shape decode (:mod:`dsr1.engine.paged_graph`, what CUDA captures per bucket),
  run eagerly with the reference kernel: an engine on it decodes exactly what requests decode
  alone, through preemption (table rows rewritten) and bucket padding (scratch block).
"""
from __future__ import annotations

import random

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.engine import Engine
from dsr1.engine.paged import PagedKV, PagedStep, decode_reference
from dsr1.engine.paged_graph import BUCKETS
from dsr1.engine.prefill import PackedPrefill
from dsr1.engine.runner import PagedRunner
from dsr1.interfaces import SamplingParams

from .test_paged_attention import sdpa_call


def _attn(q, k, v, mask, scale):  # the sdpa plugin's mask=None convention: causal, lower-right
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)[None, None]
    return sdpa_call(q, k, v, mask, scale)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_prefill_equals_the_padded_reference(window: int | None) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    h, hkv, d, bs = 4, 2, 8, 4
    rows = [(0, 7), (5, 3), (9, 1), (2, 6), (0, 2)]  # (cached tokens, new tokens)
    free = list(range(40))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-(s + n) // bs))] for s, n in rows]
    pools = [PagedKV(1, 40, bs, hkv, d, torch.float32, torch.device("cpu")) for _ in range(2)]
    cached_k, cached_v = torch.randn(40, bs, hkv, d), torch.randn(40, bs, hkv, d)
    for pool in pools:
        pool.k[0].copy_(cached_k)
        pool.v[0].copy_(cached_v)
    t = max(n for _, n in rows)
    q = torch.randn(len(rows), h, t, d)
    k, v = torch.randn(len(rows), hkv, t, d), torch.randn(len(rows), hkv, t, d)
    starts, lens = [s for s, _ in rows], [n for _, n in rows]
    ref = PagedStep(pools[0], tables, starts, lens, t, window, torch.device("cpu"))
    want = ref.attend(0, q, k, v, sdpa_call, d**-0.5, windowed=window is not None)  # (B, H, T, D)
    packed = PackedPrefill(pools[1], tables, starts, lens, window, torch.device("cpu"))
    pick = lambda x: torch.cat([x[i, :, t - n :] for i, n in enumerate(lens)], dim=1)[None]  # noqa: E731
    got = packed.attend(0, pick(q), pick(k), pick(v), _attn, d**-0.5, windowed=window is not None)
    torch.testing.assert_close(got, pick(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools[1].k[0], pools[0].k[0])
    assert packed.positions[0].tolist() == [p for s, n in rows for p in range(s, s + n)]
    assert packed.last.tolist() == [sum(lens[: i + 1]) - 1 for i in range(len(lens))]


@pytest.fixture(scope="module")
def reference() -> AutoModel:
    return AutoModel.from_pretrained("dsr1-tiny")


def _static_engine(num_blocks: int | None = None, block_size: int = 16, max_rows: int = 256) -> Engine:
    engine = Engine.from_pretrained("dsr1-tiny", kvcache={"name": "paged", "options": {"block_size": block_size}},
                                    num_blocks=num_blocks)
    engine.runner = PagedRunner(engine.model, engine.runner.decoder, engine.num_blocks, block_size,
                                engine.max_model_len, decode_kernel=decode_reference, max_rows=max_rows,
                                capture=False)
    assert engine.runner.static_decode is not None
    return engine


def test_static_decode_matches_requests_run_alone(reference: AutoModel) -> None:
    rng = random.Random(3)
    reqs = [([rng.randrange(10, 2000) for _ in range(rng.randint(3, 40))], rng.randint(2, 20)) for _ in range(11)]
    engine = _static_engine()
    prefills = _count_prefills(engine)
    outs = engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs])
    for (prompt, n), out in zip(reqs, outs):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=n, ignore_eos=True)[0, len(prompt):]
        assert out.output_ids == want.tolist()
    assert prefills == []  # every prompt was short: its tokens ran as rows of the static step
    decode = engine.runner.static_decode
    assert engine.step() == []  # an idle step hands the runner the last finished ids
    assert 11 not in BUCKETS and 16 in decode.buckets  # 11 rows ran padded to the 16 bucket
    assert not decode.rows and len(decode.free_rows) == decode.max_rows  # every table row given back
    # the scratch block is the one past the manager's: padding rows never touched a real block
    assert engine.runner.kv.num_blocks == engine.num_blocks + 1


def _count_prefills(engine: Engine) -> list[int]:
    """Chunk lengths the runner sends through the packed prefill (not as rows)."""
    seen: list[int] = []
    real = engine.runner._prefill

    def spy(group):  # type: ignore[no-untyped-def]
        seen.extend(len(s.token_ids) for s in group)
        return real(group)

    engine.runner._prefill = spy  # type: ignore[method-assign]
    return seen


def test_prefix_hit_suffix_and_long_prompts_take_the_right_path(reference: AutoModel) -> None:
    """A long prompt goes through the packed prefill; a later request sharing its first blocks
    computes only its short suffix, as rows; both decode what they decode alone."""
    rng = random.Random(6)
    shared = [rng.randrange(10, 2000) for _ in range(96)]
    first, second = shared + [5, 6, 7], shared + [rng.randrange(10, 2000) for _ in range(9)]
    engine = _static_engine()
    prefills = _count_prefills(engine)
    for prompt in (first, second):
        out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=6, ignore_eos=True)[0, len(prompt):]
        assert out.output_ids == want.tolist()
    assert prefills == [len(first)]  # the second request's 9 + 0 uncached tokens ran as rows
    assert engine.stats()["prefix_hits"] > 0


def test_static_decode_survives_preemption(reference: AutoModel) -> None:
    rng = random.Random(4)
    reqs = [([rng.randrange(10, 2000) for _ in range(rng.randint(3, 30))], rng.randint(8, 24)) for _ in range(10)]
    engine = _static_engine(num_blocks=30, block_size=4)
    outs = engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs])
    assert sum(engine.requests_preempted.values()) > 0
    for (prompt, n), out in zip(reqs, outs):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=n, ignore_eos=True)[0, len(prompt):]
        assert out.output_ids == want.tolist()
    engine.blocks.check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton paged kernel need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_decode_matches_the_gathering_reference_on_cuda(dtype: torch.dtype) -> None:
    """The captured per-bucket step (Triton kernel, device-side tables) decodes what the eager
    gathering path decodes, across buckets, preemption and rows finishing at different times."""
    rng = random.Random(5)
    reqs = [([rng.randrange(10, 2000) for _ in range(rng.randint(3, 90))], rng.randint(2, 40)) for _ in range(37)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs]
    outs = {}
    for captured in (True, False):
        model = AutoModel.from_pretrained("dsr1-tiny", dtype=dtype, device="cuda", kvcache="paged",
                                          scheduler="continuous")
        engine = Engine(model, num_blocks=120)
        if not captured:
            engine.runner = PagedRunner(engine.model, engine.runner.decoder, engine.num_blocks, engine.block_size,
                                        engine.max_model_len, decode_kernel=None)
        else:
            assert engine.runner.static_decode is not None and engine.runner.static_decode.capture
        outs[captured] = [o.output_ids for o in engine.generate([p for p, _ in reqs], params)]
        if captured:
            assert sum(engine.requests_preempted.values()) > 0
            assert all(set(b.graphs) == {"cudagraph"} for b in engine.runner.static_decode.buckets.values())
            assert len(engine.runner.static_decode.buckets) > 3
        engine.blocks.check()
    same = sum(a == b for a, b in zip(outs[True], outs[False]))
    # bf16 reductions in another order may flip a near-tie late in a row; fp32 must agree exactly
    assert same == len(reqs) if dtype == torch.float32 else same >= len(reqs) - 2

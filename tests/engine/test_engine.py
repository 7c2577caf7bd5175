"""The engine loop on CPU: continuous batching over the paged pool gives every request what it
gets alone, through preemption, prefix sharing, aborts and bad requests."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.engine import AsyncEngine, Engine
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams


@pytest.fixture(scope="module")
def reference() -> AutoModel:
    return AutoModel.from_pretrained("dsr1-tiny")


def alone(model: AutoModel, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, ignore_eos=True)
    return out[0, len(prompt):].tolist()


def trace(seed: int, count: int, shared: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, 2000) for _ in range(shared)]
    return [(prefix + [rng.randrange(10, 2000) for _ in range(rng.randint(3, 60))], rng.randint(2, 24))
            for _ in range(count)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_64_concurrent_requests_equal_running_each_alone(reference: AutoModel) -> None:
    engine = Engine.from_pretrained("dsr1-tiny", scheduler={"name": "continuous",
                                                             "options": {"max_num_batched_tokens": 256}})
    reqs = trace(0, 64)
    outs = engine.generate([p for p, _ in reqs], [greedy(n) for _, n in reqs])
    for (prompt, n), out in zip(reqs, outs):
        assert out.finished and out.finish_reason == "length"
        assert out.output_ids == alone(reference, prompt, n)
    engine.blocks.check()
    assert engine.stats()["blocks_used"] == 0 and not engine.has_unfinished()


def test_a_small_pool_preempts_and_still_matches(reference: AutoModel) -> None:
    engine = Engine.from_pretrained("dsr1-tiny", kvcache={"name": "paged", "options": {"block_size": 4}},
                                    num_blocks=40)
    reqs = trace(1, 12)
    outs = engine.generate([p for p, _ in reqs], [greedy(n) for _, n in reqs])
    assert sum(engine.requests_preempted.values()) > 0  # the pool was too small for all at once
    for (prompt, n), out in zip(reqs, outs):
        assert out.output_ids == alone(reference, prompt, n)
    engine.blocks.check()


def test_prefix_cache_shares_blocks_and_keeps_outputs(reference: AutoModel) -> None:
    engine = Engine.from_pretrained("dsr1-tiny")
    reqs = trace(2, 6, shared=40)
    first = engine.generate([reqs[0][0]], [greedy(reqs[0][1])])[0]
    rest = engine.generate([p for p, _ in reqs[1:]], [greedy(n) for _, n in reqs[1:]])
    assert engine.blocks.stats["prefix_hits"] >= 5 * 32  # 40 shared tokens = 2 full blocks of 16
    for (prompt, n), out in zip(reqs, [first, *rest]):
        assert out.output_ids == alone(reference, prompt, n)


def test_abort_frees_blocks_and_others_go_on(reference: AutoModel) -> None:
    engine = Engine.from_pretrained("dsr1-tiny")
    keep = engine.add_request([5, 6, 7, 8], greedy(10))
    drop = engine.add_request([9, 10, 11], greedy(30))
    engine.step()
    engine.step()
    out = engine.abort(drop)
    assert out.finished and out.finish_reason == "abort"
    with pytest.raises(Dsr1Error, match="no running or waiting request 'nope'"):
        engine.abort("nope")
    final = engine.run()
    assert final[keep].output_ids == alone(reference, [5, 6, 7, 8], 10)
    engine.blocks.check()
    assert engine.stats()["blocks_used"] == 0


def test_requests_that_cannot_run_are_refused_at_add() -> None:
    engine = Engine.from_pretrained("dsr1-tiny", num_blocks=4)  # 4 blocks of 16 tokens
    with pytest.raises(Dsr1Error, match="context"):
        engine.add_request(list(range(10, 600)), greedy(4))
    with pytest.raises(Dsr1Error, match="block"):
        engine.add_request(list(range(10, 70)), greedy(20))  # 80 tokens > the 64 the pool holds
    with pytest.raises(Dsr1Error, match="vocabulary"):
        engine.add_request([10, 10**9], greedy(4))
    rid = engine.add_request([10, 11, 12], greedy(3))
    assert engine.run()[rid].finished


def test_text_prompts_stop_strings_and_seeded_sampling() -> None:
    engine = Engine.from_pretrained("dsr1-tiny")
    out = engine.generate(["The Python interpreter"], [SamplingParams(max_tokens=20)])[0]
    assert out.text and out.output_ids
    word = out.text.split()[1] if len(out.text.split()) > 1 else out.text.split()[0]
    stopped = engine.generate(["The Python interpreter"], [SamplingParams(max_tokens=20, stop=[word])])[0]
    assert stopped.finish_reason == "stop" and word not in stopped.text
    seeded = SamplingParams(max_tokens=12, do_sample=True, temperature=0.9, seed=7, ignore_eos=True)
    a = engine.generate(["A list comprehension"], [seeded])[0]
    crowd = engine.generate(["A list comprehension", "def f(x):", "import os"], [seeded, seeded, seeded])
    assert crowd[0].output_ids == a.output_ids  # a seed belongs to its request, whatever runs beside it


def test_async_engine_batches_concurrent_callers(reference: AutoModel) -> None:
    engine = AsyncEngine(Engine.from_pretrained("dsr1-tiny"))
    reqs = trace(3, 8)

    async def one(prompt: list[int], n: int) -> list[int]:
        last = None
        async for out in engine.generate(prompt, greedy(n)):
            last = out
        assert last is not None and last.finished
        return last.output_ids

    async def cancel_one() -> None:
        async for _ in engine.generate([20, 21, 22], greedy(40)):
            break  # closing the stream early aborts the request

    async def main() -> list[list[int]]:
        await cancel_one()
        return await asyncio.gather(*(one(p, n) for p, n in reqs))

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    for (prompt, n), ids in zip(reqs, got):
        assert ids == alone(reference, prompt, n)
    engine.engine.blocks.check()
    assert engine.engine.stats()["blocks_used"] == 0


def test_generate_runs_on_the_engine_when_the_config_picks_continuous(reference: AutoModel) -> None:
    """``model.generate`` with scheduler ``continuous``: the padded batch of the batch path, each row
    computed as its own request; a non-paged cache is refused, not silently ignored."""
    model = AutoModel.from_pretrained("dsr1-tiny", scheduler="continuous", kvcache="paged")
    ids = torch.tensor([[0, 0, 0, 15, 16, 17], [20, 21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = reference.generate(ids, mask, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, ignore_eos=True), want)
    text = "".join(model.generate(torch.tensor([[20, 21, 22]]), max_new_tokens=8, stream=True, ignore_eos=True))
    assert text == reference.tokenizer.decode(alone(reference, [20, 21, 22], 8), skip_special_tokens=True)
    wrong = AutoModel.from_pretrained("dsr1-tiny", scheduler="continuous")  # kvcache contiguous
    with pytest.raises(Dsr1Error, match="kvcache 'contiguous' has no 'paged' capability"):
        wrong.generate(ids, mask, max_new_tokens=4)


def test_a_running_output_is_a_snapshot_that_later_steps_do_not_change() -> None:
    from dsr1.engine.engine import Prefix

    ids = [5, 6, 7]
    view = Prefix(ids)
    ids.append(8)  # the engine appends the next step's token
    assert len(view) == 3 and list(view) == [5, 6, 7] and view == [5, 6, 7] and view != [5, 6, 7, 8]
    assert view[-1] == 7 and view[1:] == [6, 7] and view[-2:] == [6, 7] and view[:10] == [5, 6, 7]
    with pytest.raises(IndexError):
        view[3]

"""The engine loop over two ranks (gloo, CPU): rank 0 schedules and broadcasts each plan, rank 1
follows with the same runner; requests of different lengths that arrive and leave at different
steps give one process's greedy tokens, and the follower's own samples equal rank 0's (issue 17)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.engine.engine import Engine
from dsr1.interfaces import SamplingParams

WORLD = 2
NUM_BLOCKS = 48
#: (prompt, params, step at which it arrives): several lengths, a prefill chunk past one block, a late arrival
REQUESTS: list[tuple[list[int], dict[str, Any], int]] = [
    ([5, 17, 301, 42, 9, 77, 5, 8, 100, 200, 33, 12, 14, 15, 16, 17, 18, 19, 20], {"max_tokens": 9}, 0),
    ([3, 250], {"max_tokens": 14}, 0),
    ([11, 64, 128, 7, 99, 31, 12], {"max_tokens": 6}, 0),
    ([40, 41, 42, 43], {"max_tokens": 8}, 3),
    ([7, 8, 9, 10, 11], {"max_tokens": 10, "do_sample": True, "temperature": 1.0, "seed": 11, "logprobs": 2}, 2),
    ([60, 61, 62], {"max_tokens": 12, "do_sample": True, "temperature": 0.8, "top_k": 20}, 1),
]
ABORTED = ([90, 91, 92, 93, 94, 95], {"max_tokens": 30}, 1)  # aborted at step 4
#: three requests of 40 tokens in a pool of 5 blocks of 16: the scheduler preempts and recomputes
TIGHT_BLOCKS = 5
TIGHT = [[100 + i + j for j in range(20)] for i in range(3)]


def _engine(path: str, tensor: int) -> Engine:
    cfg = {"parallel": {"tensor": tensor, "timeout_s": 60}} if tensor > 1 else None
    model = AutoModel.from_pretrained(path, cfg, dtype="fp32", scheduler="continuous", kvcache="paged")
    return Engine(model, num_blocks=NUM_BLOCKS, detokenize=False)


def _tight(engine: Engine) -> tuple[list[list[int]], int]:
    """The preempting run's outputs and how many preemptions it took."""
    outs = engine.generate(TIGHT, SamplingParams(max_tokens=20, ignore_eos=True))
    return [list(o.output_ids) for o in outs], sum(engine.requests_preempted.values())


def _drive(engine: Engine) -> dict[str, list[int]]:
    """The requests arriving at their steps, one aborted midway; every request's output ids."""
    out: dict[str, list[int]] = {}
    pending = [(f"r{i}", *r) for i, r in enumerate(REQUESTS)] + [("aborted", *ABORTED)]
    step = 0
    while pending or engine.has_unfinished():
        for rid, prompt, params, at in [p for p in pending if p[3] <= step]:
            engine.add_request(prompt, SamplingParams(**params, ignore_eos=True), rid)
        pending = [p for p in pending if p[3] > step]
        if step == 4:
            out["aborted"] = list(engine.abort("aborted").output_ids)
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.output_ids)
        step += 1
    return out


def _rank(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    """One rank, in the package's one two-rank spawn (conftest.py's ``TWO_RANK_JOBS``)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from dsr1.parallel.lockstep import CAPACITY, Channel, follow, lead, world_group

    engine = _engine(paths["qwen2"], WORLD)
    group = world_group(engine)
    assert group is not None
    channel = Channel(group, torch.device("cpu"))
    big = {"ids": list(range(CAPACITY // 3)), "text": "ü" * 100}  # past one buffer: a second broadcast
    if rank == 0:
        channel.send(big)
        leader = lead(engine)
        assert leader is not None
        result: dict[str, Any] = {"outputs": _drive(engine)}
        leader.heartbeat_s = 0.0  # an idle engine sends heartbeats; the follower waits through them
        for _ in range(3):
            leader.idle()
        result["again"] = _drive(engine)  # the same engine, the same ids again after they finished
        leader.stop()
        leader.stop()  # once
    else:
        got = channel.receive()
        follower = follow(engine)
        result = {"big_ok": got == big, "steps": follower.steps, "mismatches": follower.mismatches,
                  "mirrored": len(follower.requests)}
    tight = Engine(engine.model, num_blocks=TIGHT_BLOCKS, detokenize=False)  # a second engine on the same model
    if rank == 0:
        leader = lead(tight)
        assert leader is not None
        result["tight"] = _tight(tight)
        leader.stop()
    else:
        result["tight_mismatches"] = follow(tight).mismatches
    result["blocks"] = engine.num_blocks
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ranks(two_ranks: Path) -> list[dict[str, Any]]:
    return [json.loads((two_ranks / "lockstep" / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_ranks_give_one_process_tokens(ckpts: dict[str, Path], ranks: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    single = _drive(_engine(str(ckpts["qwen2"]), 1))
    lead_out = ranks[0]["outputs"]
    assert set(lead_out) == set(single) == {f"r{i}" for i in range(len(REQUESTS))} | {"aborted"}
    for i, (_, params, _) in enumerate(REQUESTS):
        rid = f"r{i}"
        assert len(lead_out[rid]) == params["max_tokens"], rid
        if not params.get("do_sample"):  # greedy: exactly one process's tokens
            assert lead_out[rid] == single[rid], (rid, lead_out[rid], single[rid])
    assert lead_out["aborted"] == single["aborted"] and 0 < len(lead_out["aborted"]) < 30
    again = ranks[0]["again"]  # the same ids again once they finished: greedy and seeded requests repeat
    for i, (_, params, _) in enumerate(REQUESTS):
        if not params.get("do_sample") or "seed" in params:
            assert again[f"r{i}"] == lead_out[f"r{i}"], i


def test_preemption_under_two_ranks(ckpts: dict[str, Path], ranks: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    single = Engine(_engine(str(ckpts["qwen2"]), 1).model, num_blocks=TIGHT_BLOCKS, detokenize=False)
    outs, preempted = ranks[0]["tight"]
    assert preempted > 0  # the block tables were reset and sent again
    assert [outs, preempted] == list(_tight(single))
    assert ranks[1]["tight_mismatches"] == 0


def test_follower_mirrors_rank0(ranks: list[dict[str, Any]]) -> None:
    follower = ranks[1]
    assert follower["big_ok"]
    assert follower["steps"] > 10
    assert follower["mismatches"] == 0  # every token rank 1 sampled (greedy, seeded, unseeded) was rank 0's
    assert follower["mirrored"] == 0  # every finished or aborted request dropped
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == NUM_BLOCKS

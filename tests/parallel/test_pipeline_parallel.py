"""Pipeline parallelism over gloo on the CPU (issue 17): two stages spawned with
torch.multiprocessing give the single-process model's logits and greedy tokens (``model.generate``
and the paged engine), hold their own layers only, split uneven layer counts with each layer's
window following its index in the whole model, give the same results with and without
micro-batches; tensor x pipeline 2 x 2 decodes what one process does; bad configs are one line;
a dead stage makes the other fail in one line.

One spawn per world size: each rank runs every check's model in turn and saves what it saw."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from dsr1.auto import AutoModel
from dsr1.config import EngineConfig
from dsr1.engine import Engine, SamplingParams
from dsr1.errors import Dsr1Error
from dsr1.parallel.pipeline import check_pipeline, split_layers
from dsr1.parallel.topology import refuse_tensor_parallel, shutdown

from .conftest import assert_ranks_match, free_port, make_checkpoint

#: three rows, two left-padded: the padded-batch path runs, and two micro-batches split them 2 + 1
IDS = torch.tensor([[0, 0, 17, 301, 42, 9, 77, 5], [3, 250, 11, 64, 128, 7, 99, 31], [0, 0, 0, 8, 19, 27, 36, 45]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
NEW_TOKENS = 8
#: the paged engine's requests: different lengths, different budgets
PROMPTS = [[5, 17, 33], [3, 9, 12, 44, 45, 46, 50, 61, 70, 81, 92], [7, 8]]
BUDGETS = [6, 4, 9]
#: the two-stage checks; "qwen2-3l" splits 3 layers 2 + 1, its first layer without a sliding window;
#: "qwen3-moe" has experts in layer 0 and a dense MLP in layer 1 (the second stage's layer 0)
KINDS = ("llama", "qwen2", "qwen2-tied", "mistral", "qwen3", "qwen3-moe", "qwen2-3l")
#: kinds also run with parallel.micro_batches 1, against the default (two micro-batches)
ONE_MICRO_BATCH = ("llama", "mistral")


def _join_env(rank: int, port: int, world: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)


def _load(path: str | Path, parallel: dict[str, Any] | None = None, **extra: Any) -> Any:
    config = {"parallel": {"timeout_s": 60, **parallel}} if parallel else None
    return AutoModel.from_pretrained(path, config, dtype="fp32", **extra)


def _outputs(model: Any) -> dict[str, Any]:
    with torch.no_grad():
        logits = model(IDS, MASK).logits
    return {
        "logits": logits[MASK.bool()],
        "tokens": model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False),
        "sampled": model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, seed=7),
        "layer_bytes": [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers],
        "modules": sorted(n for n, _ in model.named_modules() if n in ("model.embed_tokens", "model.norm", "lm_head")),
        "windows": model.args.windows,
    }


def _paged(path: str | Path, parallel: dict[str, Any] | None = None) -> list[list[int]]:
    model = _load(path, parallel, kvcache="paged", scheduler="continuous")
    engine = Engine(model, num_blocks=48, detokenize=False)  # the same pool on every rank
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in BUDGETS]
    return [list(o.output_ids) for o in engine.generate(PROMPTS, params)]


def _rank_two_stages(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    """One rank of two stages: every kind in turn, then the dead-stage check (rank 1 leaves)."""
    _join_env(rank, port, 2)
    pp = {"pipeline": 2}
    results: dict[str, Any] = {}
    for kind in KINDS:
        results[kind] = {**_outputs(_load(paths[kind], pp)), "paged": _paged(paths[kind], pp)}
    for kind in ONE_MICRO_BATCH:
        results[f"{kind}-m1"] = _outputs(_load(paths[kind], {**pp, "micro_batches": 1}))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    model = _load(paths["llama"], {**pp, "timeout_s": 5})
    if rank == 1:
        os._exit(0)  # as a killed stage: no goodbye to the process group
    try:
        model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
        message = "generate finished without its peer"
    except Dsr1Error as err:
        message = str(err)
    (Path(out) / "dead.txt").write_text(message)
    os._exit(0)  # as in conftest's _two_ranks: no teardown of a group whose peer is gone


@pytest.fixture(scope="module")
def paths(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    three = make_checkpoint(tmp_path_factory.mktemp("pp-ckpt") / "qwen2-3l", "qwen2", num_hidden_layers=3,
                            use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return {**{kind: str(p) for kind, p in ckpts.items()}, "qwen2-3l": str(three)}


@pytest.fixture(scope="module")
def two_stages(paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("pp-out")
    mp.spawn(_rank_two_stages, args=(free_port(), paths, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], out


@pytest.mark.parametrize("kind", KINDS)
def test_two_stages_match_one_process(kind: str, paths: dict[str, str],
                                      two_stages: tuple[list[dict[str, Any]], Path]) -> None:
    torch.set_num_threads(1)
    single = {**_outputs(_load(paths[kind])), "paged": _paged(paths[kind])}
    ranks = [r[kind] for r in two_stages[0]]
    # every rank samples the same broadcast logits from the same seed
    assert_ranks_match(kind, ranks, single, rank_name="stage", same=("paged",))
    # each stage holds its own layers only: half of them, or 2 and 1 of 3
    assert ranks[0]["layer_bytes"] + ranks[1]["layer_bytes"] == single["layer_bytes"], kind
    assert [len(r["layer_bytes"]) for r in ranks] == ([2, 1] if kind == "qwen2-3l" else [1, 1]), kind
    assert ranks[0]["modules"] == ["model.embed_tokens"], ranks[0]["modules"]
    assert ranks[1]["modules"] == ["lm_head", "model.norm"], ranks[1]["modules"]
    # each stage's layers keep the windows of their place in the whole model
    assert ranks[0]["windows"] + ranks[1]["windows"] == single["windows"], (kind, single["windows"])


@pytest.mark.parametrize("kind", ONE_MICRO_BATCH)
def test_micro_batches_change_nothing(kind: str, two_stages: tuple[list[dict[str, Any]], Path]) -> None:
    for rank, results in enumerate(two_stages[0]):
        split, whole = results[kind], results[f"{kind}-m1"]
        # equal bit for bit here; a BLAS may pick other kernels for fewer rows, hence the tolerance
        torch.testing.assert_close(split["logits"], whole["logits"], atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"{kind} stage {rank}: {m}")
        assert torch.equal(split["tokens"], whole["tokens"]) and torch.equal(split["sampled"], whole["sampled"])


def test_a_dead_stage_fails_the_other_in_one_line(two_stages: tuple[list[dict[str, Any]], Path]) -> None:
    message = (two_stages[1] / "dead.txt").read_text()
    assert message.startswith("rank 0 of 2: ") and "another rank died or hung" in message, message
    assert "\n" not in message


def _rank_tensor_by_pipeline(rank: int, port: int, path: str, out: str) -> None:
    _join_env(rank, port, 4)
    model = _load(path, {"tensor": 2, "pipeline": 2})
    tokens = model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.save({"tokens": tokens, "n_heads": model.args.n_heads, "n_layers": model.args.n_layers},
               Path(out) / f"rank{rank}.pt")
    # what a launched command does at its end: all four ranks meet, then close the group. A rank that exited
    # with the group open could see a gloo thread abort it (SIGABRT) as a peer closed its sockets.
    shutdown()


def test_tensor_by_pipeline_decodes_what_one_process_does(paths: dict[str, str], tmp_path: Path) -> None:
    mp.spawn(_rank_tensor_by_pipeline, args=(free_port(), paths["llama"], str(tmp_path)), nprocs=4, join=True)
    torch.set_num_threads(1)
    want = _load(paths["llama"]).generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
    for rank in range(4):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["tokens"], want), (rank, got["tokens"], want)
        assert (got["n_heads"], got["n_layers"]) == (2, 1), got  # half the heads of half the layers


@pytest.mark.parametrize(("parallel", "message"), [
    ({"pipeline": 3}, "parallel.pipeline 3 must be at most num_hidden_layers 2 (config.json)"),
    ({"pipeline": 2}, "parallel.tensor 1 x parallel.pipeline 2 (2 ranks) must equal the world size 1; launch with "
                      "torchrun --nproc-per-node 2"),
    ({"tensor": 2, "pipeline": 2}, "parallel.tensor 2 x parallel.pipeline 2 (4 ranks) must equal the world size 1"),
    ({"tensor": 3, "pipeline": 2}, "parallel.tensor 3 must divide num_attention_heads 4 (config.json)"),
    ({"pipeline": 0}, "config: invalid config value at 'parallel.pipeline'"),
    ({"pipeline": 2, "micro_batches": 0}, "config: invalid config value at 'parallel.micro_batches'"),
    ({"micro_batches": 2}, "config: invalid config value at 'parallel': parallel.micro_batches 2 splits a forward's "
                           "rows between pipeline stages, but parallel.pipeline is 1"),
])
def test_bad_pipeline_config_is_one_line(parallel: dict[str, Any], message: str, paths: dict[str, str]) -> None:
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained(paths["llama"], {"parallel": parallel})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_graph_pass_is_refused(paths: dict[str, str]) -> None:
    with pytest.raises(Dsr1Error, match=r"^parallel.pipeline 2 runs eagerly .* but graph is 'compile'; use graph "
                                        r"eager$"):
        AutoModel.from_pretrained(paths["llama"], {"parallel": {"pipeline": 2}, "graph": "compile"})


@pytest.mark.parametrize("model_type", ["deepseek_v3", "bert", "gpt2"])
def test_builders_that_do_not_split_refuse_pipeline(model_type: str) -> None:
    message = (f"parallel.pipeline 2: pipeline parallelism supports llama, mistral, qwen2, qwen3, qwen3_moe "
               f"(got {model_type})")
    with pytest.raises(Dsr1Error) as err:
        if model_type == "gpt2":  # the check the llama builder makes
            check_pipeline(2, model_type, 4)
        else:  # what the deepseek and bert builders call
            refuse_tensor_parallel(SimpleNamespace(config=EngineConfig.model_validate(
                {"parallel": {"pipeline": 2}})), model_type)
    assert str(err.value) == message


def test_layers_split_contiguously_earlier_stages_take_the_rest() -> None:
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]

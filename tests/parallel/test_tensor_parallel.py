"""Tensor parallelism over gloo on the CPU: two ranks spawned with torch.multiprocessing give the
single-process model's logits and greedy tokens, hold half of its weights each, refuse shapes that
do not split, and fail in one line within the timeout when the other rank is gone (issue 17)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.errors import Dsr1Error
from dsr1.parallel.topology import check_tensor

from .conftest import TINY, assert_ranks_match, free_port, write_tokenizer

WORLD = 2
#: two rows, the first left-padded: the padded-batch path of the engine runs too
IDS = torch.tensor([[0, 0, 17, 301, 42, 9, 77, 5], [3, 250, 11, 64, 128, 7, 99, 31]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
NEW_TOKENS = 8


def _join_env(rank: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)


def _outputs(model: Any) -> dict[str, Any]:
    # counted before the first generate, where a device may repack fp32 layers into its own layout (the cpu
    # device's AVX-512 panels pad each layer's outputs to a whole panel, which a tiny half-layer feels)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        logits = model(IDS, MASK).logits
    tokens = model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
    sampled = model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, seed=7)
    return {"logits": logits[MASK.bool()], "tokens": tokens, "sampled": sampled, "param_bytes": param_bytes,
            "n_kv_heads": model.args.n_kv_heads}


def _rank_all(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    """One rank, in the package's one two-rank spawn (conftest.py's ``TWO_RANK_JOBS``): every checkpoint in
    turn on the same process group, then the dead-rank check (rank 1 leaves once the model is built; rank
    0's next collective must fail, not wait forever)."""
    _join_env(rank, port)
    results = {}
    for kind, path in paths.items():
        model = AutoModel.from_pretrained(path, {"parallel": {"tensor": WORLD, "timeout_s": 60}}, dtype="fp32")
        results[kind] = _outputs(model)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    model = AutoModel.from_pretrained(paths["llama"], {"parallel": {"tensor": WORLD, "timeout_s": 5}}, dtype="fp32")
    if rank == 1:
        os._exit(0)  # as a killed rank: no goodbye to the process group
    try:
        model.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
        message = "generate finished without its peer"
    except Dsr1Error as err:
        message = str(err)
    (Path(out) / "dead.txt").write_text(message)


@pytest.fixture(scope="module")
def spawned(two_ranks: Path) -> Path:
    """What ``_rank_all`` wrote, in the package's one two-rank spawn (conftest.py's ``TWO_RANK_JOBS``)."""
    return two_ranks / "tensor-parallel"


@pytest.fixture(scope="module")
def parallel_results(spawned: Path) -> list[dict[str, Any]]:
    return [torch.load(spawned / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_two_ranks_match_one_process(kind: str, ckpts: dict[str, Path],
                                     parallel_results: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    single = _outputs(AutoModel.from_pretrained(ckpts[kind], dtype="fp32"))
    # sampling draws from the same seed on every rank over the same gathered logits
    assert_ranks_match(kind, [results[kind] for results in parallel_results], single)
    for rank, results in enumerate(parallel_results):
        got = results[kind]
        # each rank holds half of the weights, embedding and lm_head included (norms stay whole; a single KV
        # head is replicated, a little over half then)
        ratio = got["param_bytes"] / single["param_bytes"]
        assert 0.5 <= ratio < 0.53, (kind, rank, ratio)
    kv = 1 if kind == "llama-kv1" else 2
    assert [r[kind]["n_kv_heads"] for r in parallel_results] == [max(kv // WORLD, 1)] * WORLD


@pytest.mark.parametrize(("parallel", "message"), [
    ({"tensor": 3}, "parallel.tensor 3 must divide num_attention_heads 4 (config.json)"),
    ({"tensor": 2}, "parallel.tensor 2 must equal the world size 1; launch with torchrun --nproc-per-node 2"),
    ({"tensor": 0}, "config: invalid config value at 'parallel.tensor'"),
    ({"tensor": 2, "pipeline": 2}, "parallel.tensor 2 x parallel.pipeline 2 (4 ranks) must equal the world size 1"),
])
def test_bad_parallel_config_is_one_line(parallel: dict[str, Any], message: str, ckpts: dict[str, Path]) -> None:
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained(ckpts["llama"], {"parallel": parallel})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(("args", "message"), [
    (("deepseek_v3", 4, 2, 96), "parallel.tensor 2: tensor parallelism supports llama, mistral, qwen2, qwen3, "
                                "qwen3_moe (got deepseek_v3)"),
    (("llama", 8, 3, 96), "parallel.tensor 2 and num_key_value_heads 3 (config.json): one must divide the other"),
    (("llama", 4, 2, 95), "parallel.tensor 2 must divide intermediate_size 95 (config.json)"),
])
def test_shapes_that_do_not_split_are_refused(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        check_tensor(2, *args)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_dead_rank_fails_the_other_within_the_timeout(spawned: Path) -> None:
    message = (spawned / "dead.txt").read_text()
    assert message.startswith("rank 0 of 2: ") and "another rank died or hung" in message, message
    assert "\n" not in message


def test_torchrun_generate_prints_on_rank_0_only(ckpts: dict[str, Path], tmp_path: Path) -> None:
    model = ckpts["llama"]
    write_tokenizer(model)
    config = tmp_path / "tp.yaml"
    config.write_text("parallel: {tensor: 2, timeout_s: 60}\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    argv = ["generate", "The Python", "--model", str(model), "--config", str(config), "--max-new-tokens", "6",
            "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*torchrun, "-m", "dsr1", *argv], capture_output=True, text=True, env=env, timeout=120)
    one = subprocess.run([sys.executable, "-m", "dsr1", *argv[:4], *argv[6:]],
                         capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0 and one.returncode == 0, (two.stderr[-2000:], one.stderr[-2000:])
    assert two.stdout == one.stdout and two.stdout.startswith("The Python"), (two.stdout, one.stdout)


@pytest.mark.parametrize(("name", "dim", "start", "stop"), [
    ("model.layers.0.self_attn.o_proj.weight", 1, 16, 48),  # columns
    ("model.layers.1.mlp.gate_proj.weight", 0, 48, 96),  # rows
    ("model.layers.0.self_attn.q_proj.bias", 0, 0, 32),  # a 1-D tensor
    ("model.embed_tokens.weight", 0, 401, 401),  # an empty slice
])
def test_read_slice_is_the_slice_of_read(name: str, dim: int, start: int, stop: int,
                                         ckpts: dict[str, Path]) -> None:
    from dsr1.models.checkpoint import CheckpointReader

    reader = CheckpointReader(ckpts["qwen2"])
    try:
        whole = reader.read(name, torch.float32, torch.device("cpu"))
        part = reader.read_slice(name, dim, start, stop, torch.float32, torch.device("cpu"))
        with pytest.raises(Dsr1Error, match="has no slice 0:999 along dim 0"):
            reader.read_slice(name, 0, 0, 999, None, torch.device("cpu"))
    finally:
        reader.close()
    assert part.is_contiguous() and torch.equal(part, whole.narrow(dim, start, stop - start))

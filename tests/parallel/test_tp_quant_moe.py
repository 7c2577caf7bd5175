"""Quantized tensor parallelism and expert parallelism (issue 17): two ranks spawned once over gloo on the
CPU (and, where a GPU with fp8 is, once more on it) against one process under the same quant.

Tolerances, and why:

* int4 with a group that divides each rank's slice: the groups along K never cross a shard, so every rank
  quantizes its shard exactly as one process does; only the fp32 summation order differs (1e-5).
* int8, w8a8 and fp8: the per-row scales of a row-parallel layer (o_proj, down_proj) are computed over the
  rank's slice of the row, not the whole row (and w8a8/fp8 scale the activations per rank slice too), so
  the two runs are two different roundings of the same weights. Their logits differ by less than twice
  what quantization moves the single-process logits from the fp32 model's (a missing collective or a bias
  added twice moves them by the logits' own size). That tolerance guarantees no greedy token (no top-2
  gap here exceeds twice it), so the generated tokens are compared as they come out: int8 and w8a8 agree
  with one process; fp8 does not (e4m3 activations, 3 mantissa bits and one scale per rank's slice, flip
  near-tied argmaxes of this random tiny model), so fp8 is held to the logits only.
* Qwen3-MoE in fp32: experts are whole on their rank and the router is replicated: 1e-5. Quantized experts
  are quantized per row of whole experts, the same on every rank as in one process: with the row-parallel
  layers skipped the int8 model matches one process to 1e-5 too (with them quantized, a shifted hidden
  state can flip a router's top-k choice on this tiny random model, which no tolerance bounds).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsr1.auto import AutoModel
from dsr1.errors import Dsr1Error
from dsr1.models.moe import Experts
from dsr1.parallel.topology import check_tensor

from .conftest import free_port

WORLD = 2
IDS = torch.tensor([[0, 0, 17, 301, 42, 9, 77, 5], [3, 250, 11, 64, 128, 7, 99, 31]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
NEW_TOKENS = 6
F32 = {"compute_dtype": "fp32"}  # no bf16 rounding on top of the quantization: the differences are the scales'
ROWS = ["*.o_proj*", "*.down_proj*"]  # the row-parallel layers (patterns that name them with and without TP)

#: case → (checkpoint kind, quant choice, dtype, logits tolerance: "exact" (1e-5) or "quant" (2x the
#: quantization error), whether the greedy tokens must equal one process's)
Case = tuple[str, Any, str | None, str, bool]
CASES: dict[str, Case] = {
    "moe-fp32": ("qwen3-moe", None, "fp32", "exact", True),
    "moe-int8": ("qwen3-moe", {"name": "int8", "options": {**F32, "skip": ROWS}}, None, "exact", True),
    "int4": ("qwen3", {"name": "int4", "options": {**F32, "group_size": 32, "unfit": "refuse"}}, None, "exact", True),
    "int8": ("qwen3", {"name": "int8", "options": F32}, None, "quant", True),
    "w8a8": ("qwen3", {"name": "w8a8", "options": F32}, None, "quant", True),
}
#: on a GPU (fp8 needs sm89+): fp8, and the MoE paths that run only there (gathered fp32, Triton int8)
GPU_CASES: dict[str, Case] = {
    "moe-fp32": ("qwen3-moe", None, "fp32", "exact", True),
    "moe-int8": ("qwen3-moe", {"name": "int8", "options": {**F32, "skip": ROWS}}, None, "exact", True),
    "fp8": ("qwen3", {"name": "fp8", "options": F32}, None, "quant", False),
}


def _load(path: Path | str, quant: Any, dtype: str | None, device: str, tensor: int = 1) -> Any:
    config: dict[str, Any] = {} if quant is None else {"quant": quant}
    if tensor > 1:
        config["parallel"] = {"tensor": tensor, "timeout_s": 60}
    return AutoModel.from_pretrained(path, config, dtype=dtype, device=device)


def _outputs(model: Any, device: str) -> dict[str, Any]:
    ids, mask = IDS.to(device), MASK.to(device)
    # counted before the first generate, where a device may repack fp32 layers into its own layout (the cpu
    # device's AVX-512 panels pad each layer's outputs to a whole panel, which a tiny half-layer feels)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        logits = model(ids, mask).logits[mask.bool()].float().cpu()
    tokens = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False).cpu()
    experts = [(m.first, m.n, m.total) for m in model.modules() if isinstance(m, Experts)]
    return {"logits": logits, "tokens": tokens, "experts": experts, "bytes": size}


def _rank(rank: int, port: int, cases: dict[str, Any], paths: dict[str, str], device: str, out: str) -> None:
    """One rank: every case in turn on the same process group."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    if device == "cuda" and torch.cuda.device_count() < WORLD:  # both ranks on one GPU: gloo (nccl needs one each)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    elif device == "cuda":
        torch.cuda.set_device(rank)
    results = {}
    for case, (kind, quant, dtype, *_) in cases.items():
        results[case] = _outputs(_load(paths[kind], quant, dtype, device, WORLD), device)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _rank_cpu(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    """The CPU cases, run in the package's one two-rank spawn (conftest.py's ``TWO_RANK_JOBS``)."""
    _rank(rank, port, CASES, paths, "cpu", out)


def _spawn(cases: dict[str, Any], ckpts: dict[str, Path], device: str, out: Path) -> list[dict[str, Any]]:
    paths = {kind: str(ckpts[kind]) for kind, *_ in cases.values()}
    mp.spawn(_rank, args=(free_port(), cases, paths, device, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _compare(case: str, spec: Case, ckpts: dict[str, Path], device: str, ranks: list[dict[str, Any]]) -> None:
    kind, quant, dtype, tolerance, same_tokens = spec
    single = _outputs(_load(ckpts[kind], quant, dtype, device), device)
    if tolerance == "quant":  # two roundings of the same weights: within twice what one moves the logits
        reference = _outputs(_load(ckpts[kind], None, "fp32", device), device)["logits"]
        atol, rtol = 2 * float((single["logits"] - reference).abs().max()), 0.0
    else:
        atol = rtol = 1e-5  # "exact": the same fp32 products, summed in another order
    for rank, results in enumerate(ranks):
        got = results[case]
        torch.testing.assert_close(got["logits"], single["logits"], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{case} rank {rank} logits: {m}")
        if same_tokens:
            assert torch.equal(got["tokens"], single["tokens"]), (case, rank, got["tokens"], single["tokens"])
        ratio = got["bytes"] / single["bytes"]  # parameters and buffers (int8/int4 weights, scales): half each
        assert 0.5 <= ratio < 0.53, (case, rank, ratio)
        if single["experts"]:  # each rank holds half of every layer's experts, its own half
            half = single["experts"][0][1] // WORLD
            assert got["experts"] == [(rank * half, half, n) for _, n, _ in single["experts"]], (case, got["experts"])


@pytest.fixture(scope="module")
def cpu_ranks(two_ranks: Path) -> list[dict[str, Any]]:
    return [torch.load(two_ranks / "tp-quant-moe" / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(case: str, ckpts: dict[str, Path], cpu_ranks: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    _compare(case, CASES[case], ckpts, "cpu", cpu_ranks)


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_gpu(), reason="fp8 needs an NVIDIA GPU of compute capability 8.9+")
def test_fp8_and_gpu_experts_on_two_ranks(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ranks = _spawn(GPU_CASES, ckpts, "cuda", tmp_path)
    for case, spec in GPU_CASES.items():  # the MoE paths first: fp8's checks are the loosest
        _compare(case, spec, ckpts, "cuda", ranks)


def test_experts_that_do_not_split_are_refused() -> None:
    with pytest.raises(Dsr1Error) as err:
        check_tensor(4, "qwen3_moe", 8, 4, 0, experts=6)
    message = str(err.value)
    assert message == ("parallel.tensor 4 must divide num_experts 6 (config.json): each rank holds whole "
                       "experts; pick one of 1, 2"), message


@pytest.mark.parametrize(("quant", "message"), [
    # o_proj takes 64 inputs (4 heads of 16) in one process, 32 on each of 2 ranks
    ({"name": "int4", "options": {"group_size": 64}},
     "parallel.tensor 2 with int4 group_size 64: each rank's o_proj takes 32 of the 64 inputs, which 64 does not "
     "divide; use group_size 32"),
    ({"name": "int8", "options": {"skip": ["lm_head"]}},
     "quant skip 'lm_head' under parallel.tensor 2: layer 'lm_head' holds its linear as 'lm_head.linear'; write "
     "'lm_head*', which names it either way"),
])
def test_quant_that_does_not_shard_is_refused(quant: dict[str, Any], message: str, ckpts: dict[str, Path]) -> None:
    with pytest.raises(Dsr1Error) as err:  # refused before joining the ranks: one process is enough
        _load(ckpts["qwen3"], quant, None, "cpu", WORLD)
    assert str(err.value) == message, str(err.value)

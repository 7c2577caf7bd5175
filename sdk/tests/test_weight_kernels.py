"""The SDK's weight-only Triton kernels on the CPU, through Triton's interpreter: each format at one row (GEMV)
and three (``tl.dot``), without and with split-K, against the SDK schemes' dequantized weight times ``x``; the
bit tricks that turn int8 and e4m3 bytes into floats, exactly, for every code. Skipped where triton is absent
(``make test``); the GPU benchmark checks the same kernels on CUDA."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dsr1_sdk.kernels import FORMATS, INTERPRETER_CASES, run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (CUDA builds of torch ship it)")

#: ``worst`` relative error (max |y - want| / max |want|) of each case; fp16 activations: the interpreter
#: has no bf16 atomics (the dot kernel's split) and its bf16 ``tl.dot`` is wrong (the GPU's are not), so bf16
#: runs one row only, unsplit and split (the GEMV's split adds fp32 partials, no atomics).
_CASES = """
import json, torch
import torch.nn.functional as F
from dsr1_sdk.kernels import INTERPRETER_CASES
from dsr1_sdk.kernels.weight_only import weight_only_mm, weight_only_mm_with
from dsr1_sdk.quant import (fp8_dequantize, fp8_per_channel, int4_dequantize, int4_groupwise, int8_dequantize,
                            int8_per_channel, pack_nibbles)
fmt = {fmt!r}
g = torch.Generator().manual_seed(0)

def operands(n, k, dtype):
    w = torch.randn(n, k, generator=g)
    if fmt == "int8":
        q, s = int8_per_channel(w, dtype)
        return (q, s, None, 0), int8_dequantize(q, s)
    if fmt == "int4":
        q, s, z = int4_groupwise(w, 32, dtype)
        return (pack_nibbles(q), s, z, 32), int4_dequantize(q, s, z, 32)
    if fmt == "fp8":
        q, s = fp8_per_channel(w)
        return (q.view(torch.uint8), s, None, 0), fp8_dequantize(q, s)
    return (w.to(dtype), None, None, 0), w.to(dtype).float()

errors = {{}}
# N = 40 and K = 256 leave partial tiles (masks); 32 x 128 with a split of 2 divides evenly (the unmasked path)
for n, k, rows, config in [(40, 256, m, c) for m, c in INTERPRETER_CASES] + [
        (32, 128, 1, {{"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}})]:
    args, w = operands(n, k, torch.float16)
    x = torch.randn(rows, k, generator=g).to(torch.float16)
    y = weight_only_mm_with(x, fmt, *args, config)
    assert y.shape == (rows, n) and y.dtype == torch.float16
    want = F.linear(x.float(), w)
    errors[f"{{rows}}x{{n}}x{{k}} split {{config['SPLIT_K']}}"] = float((y.float() - want).abs().max() / want.abs().max())
args, w = operands(40, 256, torch.bfloat16)
x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
want = F.linear(x.float(), w)
errors["1x40x256 bf16 (tuned op)"] = float((weight_only_mm(x, fmt, *args).float() - want).abs().max() / want.abs().max())
# the GEMV's split sums fp32 partials in a workspace it leaves clean: bf16 too, the same bits on a second call
split = {{"BLOCK_N": 16, "BLOCK_K": 64 if fmt == "int4" else 32, "SPLIT_K": 3}}
first, again = (weight_only_mm_with(x, fmt, *args, split) for _ in range(2))
assert torch.equal(first, again), "a second split call differs: the workspace was not left clean"
errors["1x40x256 bf16 split 3"] = float((first.float() - want).abs().max() / want.abs().max())
print(json.dumps(errors))
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_match_the_dequantized_weight(fmt: str) -> None:
    errors = json.loads(run_interpreted(_CASES.format(fmt=fmt)).strip().splitlines()[-1])
    assert len(errors) == len(INTERPRETER_CASES) + 3
    worst = max(errors, key=errors.__getitem__)
    # fp16 output rounding (2^-11), a split's extra roundings, bf16 rows (2^-8): all well inside 1e-2
    assert errors[worst] < 1e-2, f"{fmt}: worst case {worst}: relative error {errors[worst]:.2e}"


#: every int8 code and every finite e4m3 code as a weight; a one-hot row picks one column, so the output is the
#: codes' float values exactly (scales 1), through the GEMV and, with a second row, the dot kernel.
_CODES = """
import torch
from dsr1_sdk.kernels.weight_only import weight_only_mm_with
fmt = {fmt!r}
if fmt == "int8":
    q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(16, 16)
    want = q.float()
else:
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0], dtype=torch.uint8)  # no NaN
    q = codes.reshape(16, 16)
    want = q.view(torch.float8_e4m3fn).float()
ones = torch.ones(16, dtype=torch.float16)
for j in range(16):
    for rows in (1, 2):
        x = torch.zeros(rows, 16, dtype=torch.float16)
        x[:, j] = 1
        y = weight_only_mm_with(x, fmt, q.contiguous(), ones, None, 0, {{"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1}})
        assert torch.equal(y[0].float(), want[:, j]), (j, rows, y[0].tolist(), want[:, j].tolist())
print("ok")
"""


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_byte_to_float_is_exact_for_every_code(fmt: str) -> None:
    assert run_interpreted(_CODES.format(fmt=fmt)).strip().endswith("ok")


def test_bad_operands_are_refused_with_the_reason() -> None:
    """Shape and format checks run before any kernel (no triton import needed beyond the module)."""
    code = """
import torch
from dsr1_sdk.kernels.weight_only import weight_only_mm
x = torch.randn(1, 64).half()
for args, words in [(("int3", torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), None, 0), "no format 'int3'"),
                    (("int4", torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 48),
                     "group a multiple of 32"),
                    (("int8", torch.zeros(8, 63, dtype=torch.int8), torch.ones(8), None, 0), "does not fit x with K=64")]:
    try:
        weight_only_mm(x, *args)
    except ValueError as err:
        assert words in str(err), str(err)
    else:
        raise AssertionError(args[0])
print("ok")
"""
    assert run_interpreted(code).strip().endswith("ok")


def test_tuning_space_keeps_splits_only_where_they_can_pay() -> None:
    """The pruning the autotuner applies per shape (pure Python: no kernel runs)."""
    from dsr1_sdk.kernels import weight_only as wo

    def kept(configs: list, n: int, k: int, fmt: str, group: int = 0, dot: bool = False) -> list:
        extra = {"BLOCK_M": 16} if dot else {}
        return wo._prune(configs, {"N": n, "K": k}, FMT=wo._CODE[fmt], GROUP=group, **extra)

    def splits(configs: list) -> set[int]:
        return {c.kwargs["SPLIT_K"] for c in configs}

    assert splits(kept(wo.GEMV_CONFIGS, 37888, 3584, "int8")) == {1}  # gate_up: programs enough without
    assert splits(kept(wo.GEMV_CONFIGS, 3584, 18944, "int8")) == set(wo._SPLITS)  # down_proj
    int4 = kept(wo.GEMV_CONFIGS, 3584, 3584, "int4", 512)
    assert int4 and all(c.kwargs["BLOCK_K"] % 512 == 0 for c in int4)  # a GEMV tile holds whole groups
    dot4 = kept(wo.DOT_CONFIGS, 3584, 3584, "int4", 64, dot=True)
    shapes = [(c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"], c.num_warps, c.num_stages) for c in dot4]
    assert len(shapes) == len(set(shapes)) < len(wo.DOT_CONFIGS)  # BLOCK_K copies dropped: one group per step
    assert kept(wo.GEMV_CONFIGS, 16, 64, "int4", 128)  # nothing fits: still one config, never none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the split's memory ordering is the GPU's)")
@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_exact_split_on_cuda_for_every_config_and_in_graph_replays(fmt: str) -> None:
    """Each split GEMV config sums its partials in a fixed order: equal to the unsplit fp32 sum up to the output
    rounding, the same bits on every call, and the same again in replays of a captured CUDA graph (the counters
    are back at 0 after each call; a leftover count would make the next call store a partial sum)."""
    import torch.nn.functional as F

    from dsr1_sdk.kernels.weight_only import GEMV_CONFIGS, weight_only_mm_with
    from dsr1_sdk.quant import int8_dequantize, int8_per_channel

    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 1000, 4096  # 1000 outputs: the last column block is partial (masked)
    w = torch.randn(n, k, device="cuda", generator=g)
    if fmt == "int8":
        q, s = int8_per_channel(w, torch.bfloat16)
        args, dense = (q, s, None, 0), int8_dequantize(q, s).float()
    else:
        args, dense = (w.to(torch.bfloat16), None, None, 0), w.to(torch.bfloat16).float()
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    want = F.linear(x.float(), dense)
    splits = [c for c in GEMV_CONFIGS if c.kwargs["SPLIT_K"] > 1]
    assert splits
    for c in splits:
        config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        first = weight_only_mm_with(x, fmt, *args, config)
        again = weight_only_mm_with(x, fmt, *args, config)
        assert torch.equal(first, again), config
        err = float((first.float() - want).abs().max() / want.abs().max())
        assert err < 1e-2, (config, err)
    config = {**splits[-1].kwargs, "num_warps": splits[-1].num_warps, "num_stages": splits[-1].num_stages}
    eager = weight_only_mm_with(x, fmt, *args, config)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        weight_only_mm_with(x, fmt, *args, config)  # warm-up on the capture's stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = weight_only_mm_with(x, fmt, *args, config)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)

"""The SDK's CPU decode attention (:func:`dsr1_sdk.kernels.cpu.decode_attention`) against the fp64 reference.

Every dispatch path this CPU runs (forced), fp32/bf16/fp16, 1 to 16 query heads per key/value head (9 and 16: a
second tile of the score GEMV), head sizes that leave masked and scalar tails, keys and values read in place from
views of a longer cache with batch strides of their own, and one sequence of one key/value head whose 1,000 keys
are split across the threads (the ranges' softmax parts merged). Under ``torch.compile`` it is one opaque op whose cache length
stays a symbol (a new length compiles nothing). Bad input is one line.
"""
from __future__ import annotations

import pytest
import torch

from dsr1_sdk import Dsr1Error
from dsr1_sdk.kernels import cpu
from dsr1_sdk.reference import softmax_attention

REASON = cpu.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels unavailable: {REASON}")

#: (batch, key/value heads, query heads per key/value head, keys, head size)
SHAPES = [(1, 4, 3, 100, 64), (2, 2, 9, 33, 72), (1, 3, 1, 5, 20), (3, 1, 8, 17, 130), (1, 1, 16, 1000, 40)]
#: worst error allowed against the fp64 reference: fp32 accumulation, or the output's own rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _operands(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q (B, Hkv, G, D), and k, v (B, Hkv, S, D) as views of caches 7 positions longer, batch-major in one buffer."""
    b, hkv, g, s, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    cache = torch.randn(hkv, 2, b, s + 7, d, generator=gen).to(dtype).permute(1, 2, 0, 3, 4)  # (2, B, Hkv, S+7, D)
    return q, cache[0][:, :, :s], cache[1][:, :, :s]


@pytest.mark.parametrize("path", cpu.paths() if REASON is None else ())
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_matches_the_reference(path: str, dtype: torch.dtype) -> None:
    for i, shape in enumerate(SHAPES):
        q, k, v = _operands(shape, dtype, seed=i)
        b, hkv, g, s, d = shape
        assert not k.is_contiguous() or b * hkv == 1  # (one sequence of one head: a prefix is contiguous)
        for scale in (None, 0.7):
            got = cpu.decode_attention(q, k, v, d**-0.5 if scale is None else scale, path=path)
            assert got.shape == q.shape and got.dtype == dtype
            # the reference takes the grouped layout as G query heads per key/value head: (B, Hkv·G, 1, D)
            want = softmax_attention(q.reshape(b, hkv * g, 1, d), k, v, scale=scale).reshape(q.shape)
            err = (got.double() - want).abs().max().item()
            assert err < TOL[dtype] * max(1.0, want.abs().max().item()), f"{shape} {dtype} {path}: {err}"


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_split_keys_merge_to_the_reference(threads: int) -> None:
    """One sequence of one key/value head: with more threads than (batch, head) pairs, the keys are split into
    ranges (at most one per thread, 256 keys or more each) whose softmax parts merge to the whole; one thread
    splits nothing. Scores far apart across ranges check the merge's rescaling."""
    q, k, v = _operands((1, 1, 5, 1100, 48), torch.float32, seed=threads)
    k = k.clone()
    k[:, :, 900:] *= 6  # the last range's scores dwarf the first's
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.decode_attention(q, k, v, 0.3)
    finally:
        torch.set_num_threads(before)
    want = softmax_attention(q.reshape(1, 5, 1, 48), k, v, scale=0.3).reshape(q.shape)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_large_scores_stay_finite() -> None:
    """Scores in the thousands (a softmax without its maximum taken off would overflow) give the reference."""
    q, k, v = _operands((1, 2, 3, 40, 32), torch.float32, seed=9)
    got = cpu.decode_attention(q * 100, k, v, 1.0)
    want = softmax_attention((q * 100).reshape(1, 6, 1, 32), k, v, scale=1.0).reshape(q.shape)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_one_op_and_no_recompile_per_length() -> None:
    """Compiled, the op is one opaque call and the cache length a symbol: lengths 5 to 9 compile twice
    (the first length, then the dynamic one), not five times."""
    graphs: list[torch.fx.GraphModule] = []

    def counter(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    cache = torch.randn(2, 1, 2, 16, 8)  # (k/v, B, Hkv, capacity, D)

    @torch.compile(backend=counter)
    def step(q: torch.Tensor, n: int) -> torch.Tensor:
        return cpu.decode_attention(q, cache[0][:, :, :n], cache[1][:, :, :n], 0.5)

    q = torch.randn(1, 2, 3, 8)
    for n in range(5, 10):
        want = softmax_attention(q.reshape(1, 6, 1, 8), cache[0][:, :, :n], cache[1][:, :, :n], scale=0.5)
        torch.testing.assert_close(step(q, n).double(), want.reshape(q.shape), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2
    for gm in graphs:  # one call of the op per graph: nothing traced into
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert sum("cpu_decode_attention" in t for t in targets) == 1, targets


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 5, 8)), "one float dtype"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)), "must be (B, Hkv, S, D)"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)), "must be (B, Hkv, S, D)"),
    ((torch.randn(2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), "takes q (B, Hkv, G, D)"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), "at least one key"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 8, 5).transpose(2, 3), torch.randn(1, 2, 5, 8)),
     "last dimension must be contiguous"),
    ((torch.ones(1, 2, 3, 8, dtype=torch.int32),) * 3, "one float dtype"),
])
def test_bad_input_is_one_line(args: tuple[torch.Tensor, ...], message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        cpu.decode_attention(*args, scale=1.0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_path_is_one_line() -> None:
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(Dsr1Error, match="not a CPU GEMV path"):
        cpu.decode_attention(q, q, q, 1.0, path="neon")

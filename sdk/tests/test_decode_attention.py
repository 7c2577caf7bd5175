"""The SDK's CUDA decode attention (``dsr1_sdk.kernels.decode_attention``): on the CPU through Triton's
interpreter (fp16: its bf16 ``tl.dot`` is wrong), and on CUDA where there is one, against attention computed in
fp32 by plain torch; the merge of the key chunks, masks, padding of odd head counts and dims, graph replays."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dsr1_sdk.kernels import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (CUDA builds of torch ship it)")

#: (B, Hkv, G, D, S, mask): odd G and D are padded inside; S not a multiple of the 64-key step; masks with
#: holes, a valid prefix (the captured step's), one row shared by the batch, none; a row whose chunk is all masked.
CASES = [(2, 2, 3, 64, 150, "holes"), (1, 4, 7, 128, 256, "prefix"), (2, 1, 1, 80, 70, None),
         (3, 2, 4, 32, 200, "shared"), (1, 2, 2, 64, 300, "late")]

_REFERENCE = '''
import torch

def reference(q, k, v, mask, scale):
    scores = torch.einsum("bhgd,bhsd->bhgs", q.float(), k.float()) * scale  # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, 0:1, :].expand_as(scores), float("-inf"))
    return torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v.float())

def operands(b, hkv, g, d, s, kind, dtype, device, gen):
    q, k, v = (torch.randn(b, hkv, n, d, generator=gen).to(device, dtype) for n in (g, s, s))
    mask = None
    if kind == "holes":
        mask = torch.rand(b, 1, 1, s, generator=gen) < 0.7
        mask[..., 0] = True
    elif kind == "prefix":
        mask = torch.arange(s)[None, None, None, :] < torch.tensor([s - 57])[:, None, None, None]
    elif kind == "shared":
        mask = (torch.arange(s) % 3 != 1)[None, None, None, :]
    elif kind == "late":  # only the last keys: every earlier chunk is all masked
        mask = (torch.arange(s) >= s - 5)[None, None, None, :].expand(b, 1, 1, s).clone()
    return q, k, v, None if mask is None else mask.to(device)
'''

_INTERPRETED = _REFERENCE + '''
import json
from dsr1_sdk.kernels.decode_attention import decode_attention
gen = torch.Generator().manual_seed(0)
errors = []
for case in CASES:
    q, k, v, mask = operands(*case, torch.float16, "cpu", gen)
    scale = case[3] ** -0.5
    out = decode_attention(q, k, v, mask, scale)
    again = decode_attention(q, k, v, mask, scale)
    assert torch.equal(out, again), "a second call differs: the counters were not left at 0"
    want = reference(q, k, v, mask, scale)
    errors.append(float((out.float() - want).abs().max() / want.abs().max()))
print(json.dumps(errors))
'''


def test_interpreted_kernel_matches_the_reference() -> None:
    errors = json.loads(run_interpreted(f"CASES = {CASES!r}\n" + _INTERPRETED).strip().splitlines()[-1])
    assert len(errors) == len(CASES) and max(errors) < 5e-3, errors


def test_bad_operands_are_refused_with_the_reason() -> None:
    code = '''
import torch
from dsr1_sdk.kernels.decode_attention import decode_attention
q, k = torch.zeros(1, 2, 3, 64).half(), torch.zeros(1, 2, 10, 64).half()
for args, words in [((q.float(), k.float(), k.float(), None), "fp16/bf16"),
                    ((q, k[:, :1], k[:, :1], None), "q (B, Hkv, G, D)"),
                    ((q, k, k, torch.ones(1, 1, 1, 9, dtype=torch.bool)), "boolean mask (B or 1, 1, 1, S=10)")]:
    try:
        decode_attention(*args, 0.125)
    except ValueError as err:
        assert words in str(err), str(err)
    else:
        raise AssertionError(words)
print("ok")
'''
    assert run_interpreted(code).strip().endswith("ok")


def test_split_plan_fills_the_gpu_without_short_chunks() -> None:
    from dsr1_sdk.kernels.decode_attention import BLOCK_S, split_plan

    assert split_plan(4, 256, 264) == (64, 4)  # batch 1, 4 key/value heads: one step per chunk
    chunk, splits = split_plan(4, 32768, 264)
    assert chunk % BLOCK_S == 0 and 4 * splits <= 264 + 4 and splits * chunk >= 32768
    assert split_plan(512, 100, 264) == (128, 1)  # many heads: one chunk each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_the_reference_and_replays(dtype: torch.dtype) -> None:
    from dsr1_sdk.kernels.decode_attention import decode_attention

    scope: dict = {}
    exec(_REFERENCE, scope)  # noqa: S102 - the reference shared with the interpreted run
    gen = torch.Generator().manual_seed(0)
    for case in CASES + [(1, 4, 7, 128, 4096, "prefix"), (8, 8, 4, 128, 1024, "holes")]:
        q, k, v, mask = scope["operands"](*case, dtype, "cuda", gen)
        scale = case[3] ** -0.5
        out = decode_attention(q, k, v, mask, scale)
        assert torch.equal(out, decode_attention(q, k, v, mask, scale)), case
        want = scope["reference"](q, k, v, mask, scale)
        err = float((out.float() - want).abs().max() / want.abs().max())
        assert err < 2e-2, (case, err)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = decode_attention(q, k, v, mask, scale)  # warm-up on the capture's stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, mask, scale)
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)

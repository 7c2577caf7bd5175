"""Paged attention: the engine's pool + block tables against dense attention, and the CUDA
decode kernel against the reference (under the CUDA skip)."""
from __future__ import annotations

import random

import pytest
import torch

from dsr1.engine.paged import PagedKV, PagedStep, decode_reference


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_ctx: int, pos: int, window: int | None) -> torch.Tensor:
    """One query at ``pos`` over keys ``[0, n_ctx)`` of one row: ``(H, D)`` (fp32 reference)."""
    h, hkv = q.shape[0], k.shape[0]
    keys = k.repeat_interleave(h // hkv, 0).float()  # (H, S, D)
    values = v.repeat_interleave(h // hkv, 0).float()
    idx = torch.arange(n_ctx)
    ok = idx <= pos
    if window is not None:
        ok &= idx > pos - window
    scores = (q.float()[:, None] * keys[:, :n_ctx]).sum(-1) * q.shape[-1] ** -0.5  # (H, S)
    scores = scores.masked_fill(~ok, float("-inf"))
    return (scores.softmax(-1)[..., None] * values[:, :n_ctx]).sum(1)


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_step_matches_dense_attention(window: int | None) -> None:
    """Rows with different cached prefixes and chunk lengths, blocks shuffled across the pool:
    every real query's output equals dense attention over that row's own tokens."""
    torch.manual_seed(0)
    rng = random.Random(0)
    h, hkv, d, bs = 4, 2, 8, 4
    kv = PagedKV(1, 32, bs, hkv, d, torch.float32, torch.device("cpu"))
    free = list(range(32))
    rng.shuffle(free)
    rows = [(0, 7), (5, 3), (9, 1), (2, 6)]  # (cached tokens, new tokens)
    full_k, full_v, tables = [], [], []
    for start, n in rows:
        total = start + n
        table = [free.pop() for _ in range(-(-total // bs))]
        tables.append(table)
        k = torch.randn(hkv, total, d)
        v = torch.randn(hkv, total, d)
        full_k.append(k)
        full_v.append(v)
        for p in range(start):  # the cached prefix, written by an earlier step
            kv.k[0][table[p // bs], p % bs] = k[:, p]
            kv.v[0][table[p // bs], p % bs] = v[:, p]
    t = max(n for _, n in rows)
    q = torch.randn(len(rows), h, t, d)
    k_new = torch.zeros(len(rows), hkv, t, d)
    v_new = torch.zeros(len(rows), hkv, t, d)
    for i, (start, n) in enumerate(rows):  # left-padded new tokens
        k_new[i, :, t - n :] = full_k[i][:, start:]
        v_new[i, :, t - n :] = full_v[i][:, start:]
    step = PagedStep(kv, tables, [s for s, _ in rows], [n for _, n in rows], t, window, torch.device("cpu"))
    out = step.attend(0, q, k_new, v_new, sdpa_call, d**-0.5, windowed=window is not None)
    for i, (start, n) in enumerate(rows):
        for j in range(n):
            col = t - n + j
            want = dense(q[i, :, col], full_k[i], full_v[i], start + n, start + j, window)
            torch.testing.assert_close(out[i, :, col], want, atol=1e-5, rtol=1e-5)


def _random_pool(device: str, dtype: torch.dtype, b: int, hkv: int, d: int, bs: int, lens: list[int]):
    g = torch.Generator().manual_seed(1)
    nb_total = sum(-(-n // bs) for n in lens) + 3
    k_pool = torch.randn((nb_total, bs, hkv, d), generator=g).to(device, dtype)
    v_pool = torch.randn((nb_total, bs, hkv, d), generator=g).to(device, dtype)
    perm = torch.randperm(nb_total, generator=g).tolist()
    max_blocks = max(-(-n // bs) for n in lens)
    tables = torch.zeros((b, max_blocks), dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // bs)):
            tables[i, j] = perm.pop()
    return k_pool, v_pool, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def test_decode_reference_matches_dense() -> None:
    lens = [1, 17, 40]
    k_pool, v_pool, tables, n = _random_pool("cpu", torch.float32, 3, 2, 8, 16, lens)
    q = torch.randn(3, 4, 8)
    out = decode_reference(q, k_pool, v_pool, tables, n, 8**-0.5, None)
    for i, length in enumerate(lens):
        blocks = tables[i, : -(-length // 16)].long()
        k = k_pool[blocks].reshape(-1, 2, 8)[:length].transpose(0, 1)  # (Hkv, n, D)
        v = v_pool[blocks].reshape(-1, 2, 8)[:length].transpose(0, 1)
        torch.testing.assert_close(out[i], dense(q[i], k, v, length, length - 1, None), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton paged decode kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 28, 4, 128), (8, 28, 4, 128), (5, 8, 8, 64), (3, 32, 8, 128)])
@pytest.mark.parametrize("window", [None, 100])
def test_triton_paged_decode_matches_reference(dtype: torch.dtype, shape: tuple[int, int, int, int],
                                               window: int | None) -> None:
    from dsr1.engine.paged_triton import paged_decode

    b, h, hkv, d = shape
    lens = [1 + (i * 397) % 1500 for i in range(b)]
    k_pool, v_pool, tables, n = _random_pool("cuda", dtype, b, hkv, d, 16, lens)
    q = torch.randn((b, h, d), device="cuda", dtype=dtype)
    want = decode_reference(q, k_pool, v_pool, tables, n, d**-0.5, window)
    for splits in (None, 1, 7):
        got = paged_decode(q, k_pool, v_pool, tables, n, d**-0.5, window, splits=splits)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

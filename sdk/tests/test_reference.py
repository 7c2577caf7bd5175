"""The reference oracles agree with independent computations (they are the kit's ground truth)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsr1.interfaces import MemoryInfo
from dsr1_sdk.reference import (
    CpuReferenceDevice,
    cast_error_bound,
    cast_round_trip,
    causal_mask,
    fake_quant_per_channel,
    int_error_bound,
    magnitude_mask,
    softmax_attention,
    sparsity,
    sqnr,
    topk_mask,
)
from dsr1_sdk.reference.device import check_memory_info


@pytest.mark.parametrize(("t", "s"), [(5, 5), (1, 7), (3, 8)])
def test_attention_matches_a_per_head_loop(t: int, s: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, t, 8, generator=gen), torch.randn(2, 2, s, 8, generator=gen), torch.randn(
        2, 2, s, 8, generator=gen
    )
    out = softmax_attention(q, k, v)
    for b in range(2):
        for h in range(4):
            kv = h // 2  # query heads 0,1 → kv head 0; 2,3 → kv head 1
            for i in range(t):
                visible = i + (s - t) + 1  # query i is position i + S - T
                scores = (q[b, h, i].double() @ k[b, kv, :visible].double().T) / math.sqrt(8)
                expected = torch.softmax(scores, -1) @ v[b, kv, :visible].double()
                torch.testing.assert_close(out[b, h, i], expected)


def test_attention_matches_torch_sdpa_with_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=gen) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    torch.testing.assert_close(softmax_attention(q, k, v, mask=mask, scale=0.2), expected)


def test_causal_mask_alignment() -> None:
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError):
        causal_mask(3, 2)


def test_fully_masked_rows_are_zero() -> None:
    q = k = v = torch.randn(1, 1, 2, 4)
    mask = torch.tensor([[[[True, False], [False, False]]]])
    assert torch.equal(softmax_attention(q, k, v, mask=mask)[0, 0, 1], torch.zeros(4, dtype=torch.float64))


def test_fake_quant_is_within_half_a_step() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 16).unsqueeze(1)
    w[3] = 0.0  # an all-zero channel stays zero
    q = fake_quant_per_channel(w)
    assert bool(((q - w).abs() <= int_error_bound(w)).all())
    assert torch.equal(q[3], torch.zeros(64))
    levels = (q / (w.abs().amax(1, keepdim=True) / 127)).round().nan_to_num(0.0)  # (16, 64) integers
    assert int(levels.abs().max()) == 127
    assert sqnr(w, q) > 35


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_bound_holds_and_is_tight(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=gen) * 10 ** (torch.rand(4096, generator=gen) * 10 - 6)
    err = (cast_round_trip(w, dtype) - w).abs().double()
    bound = cast_error_bound(w, dtype)
    assert bool((err <= bound).all())
    assert float((err / bound)[bound.isfinite()].max()) > 0.5  # not a loose bound


def test_sqnr_edges() -> None:
    x = torch.ones(4)
    assert sqnr(x, x) == math.inf
    assert sqnr(x, x * 1.1) == pytest.approx(20.0)


def test_topk_mask_ties_by_index() -> None:
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert topk_mask(scores, 0.6).tolist() == [False, False, True, False, True]
    w = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[True, False], [False, True]]
    assert sparsity(magnitude_mask(w, 0.5)) == 0.5
    with pytest.raises(ValueError):
        topk_mask(scores, 1.5)


def test_reference_device_and_memory_check() -> None:
    device = CpuReferenceDevice()
    assert device.probe().available and check_memory_info(device.memory_info()) == []
    assert check_memory_info(MemoryInfo(total=100, free=50, used=10))  # 100 != 50 + 10
    assert check_memory_info(MemoryInfo(total=100, free=150, used=-50))

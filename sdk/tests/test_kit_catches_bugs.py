"""Deliberately wrong implementations must FAIL the kit's checks (and right ones pass).

The check functions are what the conformance classes call, so a bug they miss is a bug
every plugin's tests would miss.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from dsr1.interfaces import AttentionMechanism, MemoryInfo, ProbeResult, Pruner, QuantPolicy
from dsr1.kvcache.contiguous import ContiguousKVCache
from dsr1.kvcache.heavy_hitter import HeavyHitterKVCache, HeavyHitterOptions
from dsr1_sdk.reference import CpuReferenceDevice, fake_quant_per_channel, int_error_bound, softmax_attention
from dsr1_sdk.reference.device import check_memory_info
from dsr1_sdk.testing.attention import CASES as ATTENTION_CASES
from dsr1_sdk.testing.attention import check_attention_case, check_batch_invariance
from dsr1_sdk.testing.device import check_matmul, check_probe
from dsr1_sdk.testing.kvcache import BATCH_CASES as KV_BATCH_CASES
from dsr1_sdk.testing.kvcache import check_kv_batch_invariance
from dsr1_sdk.testing.pruning import CASES as PRUNE_CASES
from dsr1_sdk.testing.pruning import check_mask, check_prune_model
from dsr1_sdk.testing.quant import CASES as QUANT_CASES
from dsr1_sdk.testing.quant import check_quantize_model, check_round_trip, check_sqnr

# --- attention ------------------------------------------------------------------------------


class Reference(AttentionMechanism):
    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        return softmax_attention(query, key, value, mask=mask, scale=scale, out_dtype=query.dtype)


class NoScale(Reference):
    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        return super().forward(query, key, value, mask, scale=1.0)


class TopLeftCausal(Reference):
    """The classic decode bug: SDPA's is_causal aligns queries with the FIRST keys."""

    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        if mask is None:
            t, s = query.shape[2], key.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool).tril()
        return super().forward(query, key, value, mask, scale)


class IgnoresMask(Reference):
    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        return super().forward(query, key, value, None, scale)


class TiledHeads(Reference):
    """GQA with ``repeat`` (tiles heads 0,1,0,1) instead of ``repeat_interleave`` (0,0,1,1)."""

    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        n = query.shape[1] // key.shape[1]
        return super().forward(query, key.repeat(1, n, 1, 1), value.repeat(1, n, 1, 1), mask, scale)


class Fp32Output(Reference):
    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        return super().forward(query, key, value, mask, scale).float()


class InPlace(Reference):
    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        out = super().forward(query, key, value, mask, scale)
        query.mul_(1.0 + 1e-3)
        return out


class BatchLeak(Reference):
    """Normalizes over the whole batch: right for B=1, wrong otherwise."""

    def forward(self, query: Any, key: Any, value: Any, mask: Any = None, scale: Any = None) -> torch.Tensor:
        out = super().forward(query, key, value, mask, scale)
        return out - out.mean(0, keepdim=True) + out[:1]


@pytest.mark.parametrize(
    ("impl", "case"),
    [
        (NoScale(), "prefill_mha"),
        (TopLeftCausal(), "decode_mha"),
        (TopLeftCausal(), "chunked_prefill"),
        (IgnoresMask(), "padded_batch"),
        (IgnoresMask(), "random_mask"),
        (TiledHeads(), "decode_gqa_4to1"),
        (Fp32Output(), "prefill_bf16"),
        (InPlace(), "prefill_mha"),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_wrong_attention_fails(impl: AttentionMechanism, case: str) -> None:
    with pytest.raises(AssertionError):
        check_attention_case(impl, ATTENTION_CASES[case])


def test_reference_attention_passes_every_case() -> None:
    for case in ATTENTION_CASES.values():
        check_attention_case(Reference(), case)


def test_batch_leak_fails_batch_invariance() -> None:
    check_batch_invariance(Reference(), ATTENTION_CASES["padded_batch"])
    with pytest.raises(AssertionError, match="batch row"):
        check_batch_invariance(BatchLeak(), ATTENTION_CASES["padded_batch"])


# --- kvcache --------------------------------------------------------------------------------


class OneBudgetPerBatch(HeavyHitterKVCache):
    """Gives every row the budget of the longest row: right alone, keeps too much next to a longer row."""

    def row_budgets(self, written: torch.Tensor) -> torch.Tensor:
        return super().row_budgets(written.max().expand_as(written))


class BatchScaleKV(ContiguousKVCache):
    """Rounds K/V to one grid for the whole batch (padding included): right alone, not next to other rows."""

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int) -> Any:
        step = torch.stack([key.abs().amax(), value.abs().amax()]).amax() / 127
        return super().update(layer, (key / step).round() * step, (value / step).round() * step, start)


def fraction_budget() -> HeavyHitterKVCache:
    return HeavyHitterKVCache(HeavyHitterOptions(budget=0.4, recent=3))


def test_batch_dependent_caches_fail_batch_invariance() -> None:
    case = KV_BATCH_CASES["mixed_lengths"]
    check_kv_batch_invariance(fraction_budget, case)
    check_kv_batch_invariance(ContiguousKVCache, case)
    with pytest.raises(AssertionError, match=r"batch row 1 \(left padding 7\).*keeps positions"):
        check_kv_batch_invariance(lambda: OneBudgetPerBatch(HeavyHitterOptions(budget=0.4, recent=3)), case)
    with pytest.raises(AssertionError, match=r"batch row \d .*attention output in the batch vs alone"):
        check_kv_batch_invariance(BatchScaleKV, case)


# --- quant ----------------------------------------------------------------------------------


class Int8(QuantPolicy):
    sqnr_threshold = 35.0

    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = self.quantize_tensor(m.weight.data)
        return model

    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_channel(weight)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        return int_error_bound(weight)


class Int4ClaimingInt8(Int8):
    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_channel(weight, bits=4)


class PerTensorClaimingPerChannel(Int8):
    def quantize_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_channel(weight.reshape(1, -1)).reshape(weight.shape)


class BrokenModel(Int8):
    def quantize_(self, model: torch.nn.Module) -> torch.nn.Module:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().reshape(m.weight.shape)
        return model


def test_quant_checks() -> None:
    weight = QUANT_CASES["normal_64x128"].make()
    check_round_trip(Int8(), weight)
    check_sqnr(Int8(), weight, "normal")
    check_quantize_model(Int8())
    with pytest.raises(AssertionError, match="SQNR"):
        check_sqnr(Int4ClaimingInt8(), weight, "normal")
    with pytest.raises(AssertionError, match="error bound"):
        check_round_trip(Int4ClaimingInt8(), weight)
    scaled = weight * torch.logspace(-2, 2, 64).unsqueeze(1)  # rows of very different ranges
    with pytest.raises(AssertionError, match="error bound"):
        check_round_trip(PerTensorClaimingPerChannel(), scaled)
    with pytest.raises(AssertionError, match="quantized model"):
        check_quantize_model(BrokenModel())


# --- pruning --------------------------------------------------------------------------------


class Magnitude(Pruner):
    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs()

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        from dsr1_sdk.reference import magnitude_mask

        return magnitude_mask(weight, sparsity)


class ThresholdWithTies(Magnitude):
    """``|w| > k-th value``: prunes every tie, so sparsity overshoots on tied weights."""

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        k = int(round(sparsity * weight.numel()))
        if k == 0:
            return torch.ones_like(weight, dtype=torch.bool)
        return weight.abs() > weight.abs().flatten().kthvalue(k).values


class NonzeroQuantile(Magnitude):
    """Prunes a fraction of the NONZERO weights: right once, but re-pruning prunes more."""

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        from dsr1_sdk.reference import topk_mask

        nonzero = weight != 0
        keep = torch.zeros_like(nonzero)
        keep[nonzero] = topk_mask(weight[nonzero].abs(), sparsity)
        return keep


class Inverted(Magnitude):
    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        from dsr1_sdk.reference import topk_mask

        return topk_mask(-weight.abs(), sparsity)


class PrunesHead(Magnitude):
    def prune_(self, model: torch.nn.Module, sparsity: float, calibration: Any = None) -> dict[str, torch.Tensor]:
        masks = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                masks[name] = self.mask(m.weight.data, sparsity)
                m.weight.data.mul_(masks[name])
        return masks


def test_pruning_checks() -> None:
    weight, _ = PRUNE_CASES["many_ties"].make()
    caps = frozenset({"unstructured"})
    check_mask(Magnitude(), weight, 0.5, None, caps)
    check_prune_model(Magnitude(), 0.5)
    with pytest.raises(AssertionError, match="realized sparsity"):
        check_mask(ThresholdWithTies(), weight, 0.5, None, caps)
    with pytest.raises(AssertionError, match="not idempotent"):
        check_mask(NonzeroQuantile(), PRUNE_CASES["square_64"].make()[0], 0.5, None, caps)
    with pytest.raises(AssertionError, match="kept a score"):
        check_mask(Inverted(), PRUNE_CASES["square_64"].make()[0], 0.5, None, caps)
    with pytest.raises(AssertionError, match="lm_head"):
        check_prune_model(PrunesHead(), 0.5)


# --- device ---------------------------------------------------------------------------------


def test_device_checks() -> None:
    check_probe(CpuReferenceDevice().probe())
    check_matmul(CpuReferenceDevice(), torch.float32)
    with pytest.raises(AssertionError, match="must say why"):
        check_probe(ProbeResult(available=False, reason=" "))
    with pytest.raises(AssertionError, match="device_count"):
        check_probe(ProbeResult(available=True, device_count=0))
    with pytest.raises(AssertionError, match="not a ProbeResult"):
        check_probe(True)
    assert check_memory_info(MemoryInfo(total=10, free=5, used=1))

    class WrongType(CpuReferenceDevice):
        torch_device_type = "xpu"  # claims xpu, computes on the cpu

        def torch_device(self, index: int = 0) -> torch.device:
            return torch.device("cpu")

    with pytest.raises(AssertionError, match="expected xpu"):
        check_matmul(WrongType(), torch.float32)

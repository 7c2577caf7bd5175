"""The semi24 (2:4) pruner against the SDK's conformance kit, the reference, and the CUDA path."""
from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.config import PluginChoice, load_config
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_pruning_semi24 import Semi24Pruner, dsr1_model_loaded, is_2_4, to_sparse_semi_structured_
from dsr1_sdk.reference import groups_hold_zeros, semi_structured_mask
from dsr1_sdk.testing import PruningConformance


class TestSemi24(PruningConformance):
    plugin = "semi24"


class TestSemi24Wanda(PruningConformance):
    plugin = "semi24"
    options: ClassVar[dict[str, Any]] = {"score": "wanda"}
    max_examples = 4
    test_import_starts_no_device_runtime = None  # type: ignore[assignment]  # same module as above, checked there


def make(**options: object) -> Semi24Pruner:
    return PluginRegistry().make("pruning", PluginChoice(name="semi24", options=options))


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(rows=st.integers(1, 12), groups=st.integers(1, 6), levels=st.integers(1, 4),
       sparsity=st.floats(0.5, 1.0) | st.just(0.0), seed=st.integers(0, 1000))
def test_equals_the_reference_ties_included(rows: int, groups: int, levels: int, sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-levels, levels + 1, (rows, 4 * groups), generator=gen).float()
    keep = make().mask(weight, sparsity)
    assert torch.equal(keep, semi_structured_mask(weight.abs(), sparsity))
    if sparsity > 0:
        assert groups_hold_zeros(weight * keep) and is_2_4(weight * keep)


def test_exactly_two_of_four_at_half() -> None:
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    keep = make().mask(weight, 0.5)
    assert (~keep).reshape(8, 8, 4).sum(-1).eq(2).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.49])
def test_below_half_is_refused(sparsity: float) -> None:
    with pytest.raises(Dsr1Error, match="2:4 sparsity prunes at least 50% of a weight"):
        make().mask(torch.randn(4, 8), sparsity)


def test_input_dim_not_multiple_of_4_is_skipped_and_reported() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 8))
    second = model[2].weight.clone()
    masks = make().prune_(model, 0.5)
    assert set(masks) == {"0"}
    assert torch.equal(model[2].weight, second)
    pruner = make()
    pruner.prune_(model, 0.5)
    assert pruner.skipped == {"2": "input dim 6 is not a multiple of 4: left dense"}
    with pytest.raises(Dsr1Error, match="multiple of 4"):
        pruner.mask(model[2].weight, 0.5)


def test_cpu_stays_dense_and_says_why() -> None:
    layer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.mul_(make().mask(layer.weight, 0.5))
    model = torch.nn.Sequential(layer)
    assert to_sparse_semi_structured_(model) == {"0": "on cpu, not CUDA"}
    assert layer.weight.layout == torch.strided
    assert any("dense with zeros" in n for n in make().report_notes("cpu"))


def test_load_hook_converts_only_when_selected_and_on_cuda() -> None:
    layer = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(layer)
    dsr1_model_loaded(model, load_config({"pruning": "semi24"}))  # on CPU: nothing to do
    dsr1_model_loaded(model, load_config({"pruning": "magnitude"}))
    assert not hasattr(model, "semi24_conversion") and layer.weight.layout == torch.strided


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sparse tensor cores need CUDA")
def test_cuda_conversion_matches_dense() -> None:  # pragma: no cover - needs an Ampere+ GPU
    layer = torch.nn.Linear(128, 128, bias=False).half().cuda()
    with torch.no_grad():
        layer.weight.mul_(make().mask(layer.weight, 0.5))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    dense = layer(x)
    assert to_sparse_semi_structured_(torch.nn.Sequential(layer)) == {"0": "converted"}
    torch.testing.assert_close(layer(x), dense, rtol=1e-2, atol=1e-2)

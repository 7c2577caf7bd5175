"""The wanda pruner against the SDK's conformance kit, the reference mask, and its behaviour."""
from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_pruning_wanda import WandaPruner
from dsr1_sdk.reference import magnitude_mask, wanda_mask
from dsr1_sdk.testing import PruningConformance
from dsr1_sdk.testing.pruning import TinyLM


class TestWanda(PruningConformance):
    plugin = "wanda"


class TestWandaOneShot(PruningConformance):
    plugin = "wanda"
    options: ClassVar[dict[str, Any]] = {"sequential": False}
    max_examples = 4
    test_import_starts_no_device_runtime = None  # type: ignore[assignment]  # same module as above, checked there


def make(**options: object) -> WandaPruner:
    return PluginRegistry().make("pruning", PluginChoice(name="wanda", options=options))


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), levels=st.integers(1, 5), sparsity=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_equals_the_reference_mask_ties_included(rows: int, cols: int, levels: int, sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-levels, levels + 1, (rows, cols), generator=gen).float()  # many ties
    act = torch.randint(1, 3, (cols,), generator=gen).float()
    assert torch.equal(make().mask(weight, sparsity, act), wanda_mask(weight, act, sparsity))


def test_every_row_loses_the_same_share() -> None:
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    keep = make().mask(weight, 0.5, torch.rand(40) + 0.1)
    assert (~keep).sum(1).tolist() == [20] * 16


def test_activations_change_the_choice() -> None:
    """An input feature with huge activations keeps its (small) weights; magnitude drops them."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=gen)
    weight[:, 3] = 0.05 * weight[:, 3].sign()  # small weights on feature 3...
    act = torch.ones(16)
    act[3] = 1000.0  # ...which carries large activations
    assert bool(make().mask(weight, 0.5, act)[:, 3].all())
    assert not bool(magnitude_mask(weight, 0.5)[:, 3].any())


def test_wanda_loses_less_output_than_magnitude_with_outlier_features() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=gen)
    x[:, :4] *= 30.0  # outlier features, as in LLM activations
    layer = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 32, generator=gen))
    dense = layer(x)
    norm = x.pow(2).sum(0).sqrt()  # (in,)
    errors = {}
    for name, keep in (("wanda", make().mask(layer.weight, 0.5, norm)), ("magnitude", magnitude_mask(layer.weight, 0.5))):
        errors[name] = float((x @ (layer.weight * keep).T - dense).norm().detach())
    assert errors["wanda"] < 0.7 * errors["magnitude"]


def test_prune_without_calibration_is_refused() -> None:
    with pytest.raises(Dsr1Error, match="wanda needs calibration text"):
        make().prune_(TinyLM(), 0.5)
    with pytest.raises(Dsr1Error, match="wanda needs calibration text"):
        make().prune_(TinyLM(), 0.5, [torch.empty(1, 0, dtype=torch.long)])


def test_sparsity_zero_needs_no_calibration() -> None:
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make().prune_(model, 0.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_measures_later_blocks_after_pruning_earlier_ones(sequential: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``sequential``, block 1's activations are measured with block 0 already pruned."""
    import dsr1_pruning_wanda

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(32, 16)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            for layer in self.layers:
                h = h + torch.relu(layer(h))
            return h

    model = Blocks()
    seen: list[tuple[list[str], int]] = []  # (layers measured, zeros in layers.0 at that time)
    real = dsr1_pruning_wanda.input_norms

    def spy(m: torch.nn.Module, group: list, calibration: list) -> dict:
        seen.append(([n for n, _ in group], int((model.layers[0].weight == 0).sum())))
        return real(m, group, calibration)

    monkeypatch.setattr(dsr1_pruning_wanda, "input_norms", spy)
    calib = [torch.randint(0, 32, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    make(sequential=sequential).prune_(model, 0.5, calib)
    if sequential:
        assert seen == [(["layers.0"], 0), (["layers.1"], 128)]
    else:
        assert seen == [(["layers.0", "layers.1"], 0)]

"""The magnitude pruner against the SDK's conformance kit, the reference, and its options."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_pruning_magnitude import MagnitudePruner
from dsr1_sdk.reference import magnitude_mask
from dsr1_sdk.testing import PruningConformance
from dsr1_sdk.testing.pruning import TinyLM


class TestMagnitudeLayer(PruningConformance):
    plugin = "magnitude"


class TestMagnitudeGlobal(PruningConformance):
    plugin = "magnitude"
    options = {"scope": "global"}
    max_examples = 5


def make(**options: object) -> MagnitudePruner:
    return PluginRegistry().make("pruning", PluginChoice(name="magnitude", options=options))


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(rows=st.integers(1, 30), cols=st.integers(1, 30), levels=st.integers(1, 6), sparsity=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_equals_the_reference_mask_ties_included(rows: int, cols: int, levels: int, sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-levels, levels + 1, (rows, cols), generator=gen).float()  # many ties
    assert torch.equal(make().mask(weight, sparsity), magnitude_mask(weight, sparsity))


def test_global_scope_prunes_small_layers_more() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    with torch.no_grad():
        model[1].weight.mul_(100)  # the second layer's weights dominate
    masks = make(scope="global").prune_(model, 0.5)
    assert (~masks["0"]).float().mean() > 0.9 and (~masks["1"]).float().mean() < 0.1
    total = sum(int((~m).sum()) for m in masks.values())
    assert total == round(0.5 * 2 * 32 * 32)


def test_skips_lm_head_embeddings_and_tied_weights() -> None:
    model = TinyLM()
    model.proj = torch.nn.Linear(16, 64, bias=False)
    model.proj.weight = model.embed.weight  # tied to the embedding under a name not in `skip`
    embed_before = model.embed.weight.clone()
    masks = make().prune_(model, 0.5)
    assert set(masks) == {"up", "down"}
    assert torch.equal(model.embed.weight, embed_before)


def test_skip_option() -> None:
    masks = make(skip=["lm_head", "down"]).prune_(TinyLM(), 0.5)
    assert set(masks) == {"up", "proj"}


@pytest.mark.parametrize("sparsity", [-0.1, 1.5])
def test_sparsity_out_of_range(sparsity: float) -> None:
    with pytest.raises(Dsr1Error, match="sparsity must be within"):
        make().prune_(TinyLM(), sparsity)


def test_bf16_weights() -> None:
    layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
    masks = make().prune_(torch.nn.Sequential(layer), 0.7)
    assert int((layer.weight == 0).sum()) == int((~masks["0"]).sum()) == round(0.7 * 64 * 64)


def test_unknown_scope_is_refused() -> None:
    with pytest.raises(Dsr1Error, match="pruning.options.scope"):
        make(scope="model")

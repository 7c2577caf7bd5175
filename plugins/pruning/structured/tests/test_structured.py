"""The structured pruner: the SDK's conformance kit, head/channel counts, importance, refusals."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_pruning_structured import DENSE_KEY, StructuredPruner
from dsr1_sdk.testing import PruningConformance
from dsr1_sdk.testing.pruning import TinyLM
from dsr1_sdk.testing.pruning_models import calibration, inputs, load, outputs, tiny_checkpoint


class TestStructured(PruningConformance):
    plugin = "structured"
    sparsities = (0.0, 0.25, 0.5)


class TestStructuredMagnitude(PruningConformance):
    plugin = "structured"
    options: ClassVar[dict[str, Any]] = {"importance": "magnitude"}
    sparsities = (0.0, 0.5)
    max_examples = 4
    test_import_starts_no_device_runtime = None  # type: ignore[assignment]  # same module as above, checked there


def make(**options: object) -> StructuredPruner:
    return PluginRegistry().make("pruning", PluginChoice(name="structured", options=options))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("bert"), "bert")


def test_gqa_halves_query_heads_per_group_first(llama_dir: Path) -> None:
    model = load(llama_dir, "llama")
    make().prune_(model, 0.5, calibration("llama"))
    cfg = model.config
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 16)
    assert cfg[DENSE_KEY] == {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    make().prune_(model, 0.5, calibration("llama"))  # a second stage: now whole groups go
    assert (model.config["num_attention_heads"], model.config["num_key_value_heads"]) == (1, 1)


def test_progressive_and_one_shot_remove_the_same_heads(llama_dir: Path) -> None:
    once, steps = load(llama_dir, "llama"), load(llama_dir, "llama")
    make().prune_(once, 0.5, calibration("llama"))
    for step in (0.2, 1 - 0.5 / 0.8):  # 20%, then on to 50% of the dense weights
        make().prune_(steps, step, calibration("llama"))
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    assert [once.config[k] for k in keys] == [steps.config[k] for k in keys]


def test_bert_heads_and_channels(bert_dir: Path, tmp_path: Path) -> None:
    model = load(bert_dir, "bert")
    make().prune_(model, 0.5, calibration("bert"))
    cfg = model.config
    assert (cfg["num_attention_heads"], cfg["head_dim"]) == (2, 16)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (64, 32)
    again = load(model.save_pretrained(tmp_path / "stage"), "bert")
    ids = inputs("bert")
    assert torch.equal(outputs(again, "bert", ids), outputs(model, "bert", ids))


def test_activation_importance_keeps_the_busy_channel(llama_dir: Path) -> None:
    """A channel whose down_proj column is tiny but whose activation is huge survives with
    importance='activation' and goes with importance='magnitude'."""
    results = {}
    for importance in ("activation", "magnitude"):
        model = load(llama_dir, "llama")
        mlp = model.model.layers[0].mlp
        with torch.no_grad():
            mlp.down_proj.weight[:, 5] *= 0.01
            mlp.up_proj.weight[5] *= 1000.0  # channel 5's activation is 1000x larger
            marker = mlp.up_proj.weight[5].clone()
        make(importance=importance, heads=False).prune_(model, 0.6, calibration("llama"))
        results[importance] = any(torch.equal(row, marker) for row in model.model.layers[0].mlp.up_proj.weight)
    assert results == {"activation": True, "magnitude": False}


def test_heads_false_keeps_attention(llama_dir: Path) -> None:
    model = load(llama_dir, "llama")
    make(heads=False).prune_(model, 0.3, calibration("llama"))
    assert model.config["num_attention_heads"] == 4 and model.config["intermediate_size"] < 96


def test_refuses_what_it_cannot_shrink(llama_dir: Path) -> None:
    with pytest.raises(Dsr1Error, match="structured pruning needs a dsr1 llama-family or bert model; got TinyLM"):
        make().prune_(TinyLM(), 0.5, calibration("llama"))
    from dsr1.auto import AutoModel

    fused = AutoModel.from_pretrained(llama_dir, {"device": "cpu"})
    with pytest.raises(Dsr1Error, match="needs the llama model loaded unfused"):
        make().prune_(fused, 0.5, calibration("llama"))
    with pytest.raises(Dsr1Error, match="needs calibration text"):
        make().prune_(load(llama_dir, "llama"), 0.5)

"""Model builders are chosen by the ``model_type:<t>`` capabilities their specs declare, not by a table."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dsr1.auto import AutoModel
from dsr1.config import load_config
from dsr1.errors import Dsr1Error
from dsr1.pipeline import builder_for, declared_model_types
from dsr1.registry import PluginRegistry
from tests.core.plugin_dist import fake_plugin  # noqa: F401  # the fixture

#: a builder whose plugin name ("toy") is not the model_type it builds ("toyformer").
TOY = '''
from dsr1_sdk import Dsr1Error, ModelBuilder, PluginSpec, hookimpl

class ToyBuilder(ModelBuilder):
    def build(self, model_dir, hf_config, pipeline):
        raise Dsr1Error("toy builder reached")  # what it builds does not matter here: that it was picked does

@hookimpl
def dsr1_model():
    return PluginSpec(name="toy", family="model", impl=ToyBuilder, capabilities=frozenset({"model_type:toyformer"}))
'''

#: a second plugin that also claims llama checkpoints.
RIVAL = '''
from dsr1_sdk import ModelBuilder, PluginSpec, hookimpl

class RivalBuilder(ModelBuilder):
    def build(self, model_dir, hf_config, pipeline):
        raise AssertionError("never picked silently")

@hookimpl
def dsr1_model():
    return PluginSpec(name="rival", family="model", impl=RivalBuilder, capabilities=frozenset({"model_type:llama"}))
'''

BROKEN = "raise ImportError('this builder is broken')\n"


@pytest.mark.parametrize(("model_type", "builder"), [("llama", "llama"), ("mistral", "llama"), ("qwen2", "llama"),
                                                     ("qwen3_moe", "llama"), ("deepseek_v3", "deepseek"),
                                                     ("bert", "bert")])
def test_builtin_builders_are_found_by_their_declared_types(model_type: str, builder: str) -> None:
    registry = PluginRegistry()
    assert builder_for(registry, model_type) == builder
    assert model_type in declared_model_types(registry.load("model", builder).capabilities)


def test_unknown_model_type_is_one_line_listing_the_known_ones() -> None:
    with pytest.raises(Dsr1Error) as err:
        builder_for(PluginRegistry(), "gpt_neox")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == "unknown model_type 'gpt_neox' in config.json; the installed model plugins build: bert, " \
                  "deepseek_v2, deepseek_v3, llama, mistral, qwen2, qwen3, qwen3_moe"


def _toy_checkpoint(tmp_path: Path, model_type: str) -> Path:
    ckpt = tmp_path / model_type
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": model_type}))
    return ckpt


def test_a_plugin_builds_the_type_it_declares_whatever_its_name(
    tmp_path: Path, fake_plugin: Callable[[str, str, str], str]
) -> None:
    fake_plugin("model", "toy", TOY)
    with pytest.raises(Dsr1Error, match="^toy builder reached$"):
        AutoModel.from_pretrained(_toy_checkpoint(tmp_path, "toyformer"))
    with pytest.raises(Dsr1Error, match=r"build: bert, deepseek_v2, deepseek_v3, llama, mistral, qwen2, qwen3, qwen3_moe, "
                                         r"toyformer$"):
        AutoModel.from_pretrained(_toy_checkpoint(tmp_path, "toy"))  # the plugin's name is not a type


def test_two_plugins_declaring_one_type_are_refused(
    fake_plugin: Callable[[str, str, str], str]
) -> None:
    fake_plugin("model", "rival", RIVAL)
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained("dsr1-tiny")
    assert str(err.value) == ("model_type 'llama' is declared by the model plugins llama and rival; pick one in the "
                              "config, e.g. model: llama")
    model = AutoModel.from_pretrained("dsr1-tiny", model="llama")  # an explicit choice decides
    assert type(model).__name__ == "LlamaForCausalLM"


def test_a_broken_model_plugin_is_skipped_and_named_only_when_nothing_else_fits(
    tmp_path: Path, fake_plugin: Callable[[str, str, str], str]
) -> None:
    fake_plugin("model", "broken", BROKEN)
    registry = PluginRegistry()
    assert builder_for(registry, "llama") == "llama"  # an unselected broken plugin affects nothing
    with pytest.raises(Dsr1Error, match=r"could not be checked: broken \(model plugin 'broken' .* failed to import"):
        builder_for(registry, "toyformer")


def test_an_explicit_model_that_does_not_build_the_type_is_refused() -> None:
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained("dsr1-tiny", model="bert")
    assert str(err.value) == ("model 'bert' builds model_type bert, not 'llama' (config.json); remove 'model' from the "
                              "config to pick the builder by model_type")
    pipeline = PluginRegistry().resolve(load_config({"model": "llama"}))
    assert type(pipeline.model_builder("qwen2")).__name__ == "LlamaBuilder"

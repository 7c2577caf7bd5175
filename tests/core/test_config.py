"""EngineConfig: names or {name, options}, strict keys with key paths, files, env, hardware."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsr1.config import EngineConfig, PluginChoice, load_config, read_config_file
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import FAMILIES
from dsr1.registry import PluginRegistry

SEED_HARDWARE = """\
hardware:
  type: "cambricon"
  precision: "int8"
  optimizer:
    kernel_fusion: true
    tiling_strategy: "auto"
"""


def test_one_field_per_family():
    assert set(FAMILIES) <= set(EngineConfig.model_fields)


def test_name_or_name_with_options():
    cfg = load_config({"attention": "linear", "kvcache": {"name": "paged", "options": {"block_size": 16}}})
    assert cfg.attention == PluginChoice(name="linear")
    assert cfg.kvcache is not None and cfg.kvcache.options == {"block_size": 16}


def test_defaults_fill_unset_families():
    cfg = load_config({})
    assert cfg.choice("attention") == PluginChoice(name="sdpa")
    assert cfg.choice("device") == PluginChoice(name="cpu")
    assert cfg.choice("quant") is None


def test_seed_hardware_section_verbatim(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text(SEED_HARDWARE)
    cfg = load_config(path)
    assert cfg.choice("device") == PluginChoice(name="mlu")
    assert cfg.choice("quant") == PluginChoice(name="int8")
    graph = cfg.choice("graph")
    # tiling_strategy auto with kernel fusion: the plan is measured per bucket (graph adaptive)
    assert graph is not None and graph.name == "adaptive" and graph.options == {"tiling_strategy": "auto"}


def test_kernel_fusion_on_nvidia_is_compiled_cuda_graphs():
    cfg = load_config({"hardware": {"type": "nvidia", "optimizer": {"kernel_fusion": True}}})
    assert cfg.choice("graph") == PluginChoice(
        name="cudagraph", options={"tiling_strategy": "fixed", "compile": True})
    cfg = load_config({"hardware": {"type": "nvidia", "optimizer": {"kernel_fusion": True, "tiling_strategy": "auto"}}})
    assert cfg.choice("graph") == PluginChoice(name="adaptive", options={"tiling_strategy": "auto"})


@pytest.mark.parametrize(("hw_type", "device"), [("nvidia", "cuda"), ("ascend", "npu"), ("cpu", "cpu")])
def test_hardware_types_map_to_devices(hw_type, device):
    assert load_config({"hardware": {"type": hw_type}}).choice("device") == PluginChoice(name=device)


def test_explicit_family_contradicting_hardware_is_refused():
    """Nothing wins silently: a family key that says something else than the hardware key is refused
    (tests/reliability/test_cli_errors.py has every pair); one that agrees is accepted."""
    with pytest.raises(Dsr1Error, match="quant 'bf16' contradicts hardware.precision 'int8'"):
        load_config({"hardware": {"type": "nvidia", "precision": "int8"}, "quant": "bf16"})
    cfg = load_config({"hardware": {"type": "nvidia", "precision": "int8"}, "quant": "int8"})
    assert cfg.choice("quant") == PluginChoice(name="int8")


def test_device_contradicting_hardware_is_refused():
    with pytest.raises(Dsr1Error, match="device 'cpu' contradicts hardware.type 'nvidia'"):
        load_config({"hardware": {"type": "nvidia"}, "device": "cpu"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"attentoin": "sdpa"}, "unknown config key 'attentoin'; did you mean 'attention'?"),
        ({"hardware": {"typ": "cpu"}}, "unknown config key 'hardware.typ'; did you mean 'type'?"),
        (
            {"hardware": {"optimizer": {"kernel_fusin": True}}},
            "unknown config key 'hardware.optimizer.kernel_fusin'; did you mean 'kernel_fusion'?",
        ),
        ({"attention": {"name": "sdpa", "opts": {}}}, "unknown config key 'attention.opts'; did you mean 'options'?"),
        ({"attention": 3}, "invalid config value at 'attention'"),
        ({"hardware": {"optimizer": {"kernel_fusion": "maybe"}}}, "invalid config value at 'hardware.optimizer.kernel_fusion'"),
        ({"hardware": {"optimizer": {"tiling_strategy": "fast"}}}, "'auto' or 'fixed'"),
        ({"hardware": {"type": "cambricn"}}, "unknown hardware type 'cambricn'; did you mean 'cambricon'?"),
    ],
)
def test_bad_config_is_one_line_with_key_path(data, message):
    with pytest.raises(Dsr1Error) as err:
        load_config(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_keyword_override():
    with pytest.raises(Dsr1Error, match="unknown config key 'atention'; did you mean 'attention'"):
        load_config(atention="sdpa")


def test_keyword_overrides_beat_env_beat_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('attention = "eager"\nkvcache = "paged"\ndevice = "cpu"\n')
    cfg = load_config(path, environ={"DSR1_ATTENTION": "linear", "DSR1_KVCACHE": "int8"}, kvcache="streaming")
    assert cfg.attention == PluginChoice(name="linear")
    assert cfg.kvcache == PluginChoice(name="streaming")
    assert cfg.device == PluginChoice(name="cpu")


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("attention: sdpa\nkvcache: [paged\ndevice: cpu\n")
    with pytest.raises(Dsr1Error, match=r"YAML syntax error in .*bad.yaml' at line \d"):
        read_config_file(path)


def test_toml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('attention = "sdpa"\ndevice = \n')
    with pytest.raises(Dsr1Error, match=r"TOML syntax error in .*bad.toml'.*line 2"):
        read_config_file(path)


#: a key given twice, at the top and nested: the last would win silently, so both are refused
DUPLICATE_KEYS = {
    "top.yaml": ("attention: sdpa\nattention: eager\n", "the key 'attention' twice (lines 1 and 2)"),
    "nested.yaml": ("kvcache:\n  name: paged\n  options:\n    block_size: 16\n    block_size: 32\n",
                    "the key 'block_size' twice (lines 4 and 5)"),
    "flow.yaml": ("kvcache: {name: paged, name: contiguous}\n", "the key 'name' twice (lines 1 and 1)"),
    "top.json": ('{"attention": "sdpa", "attention": "eager"}', "the key 'attention' twice in one object"),
    "nested.json": ('{"kvcache": {"name": "paged", "options": {"block_size": 16, "block_size": 32}}}',
                    "the key 'block_size' twice in one object"),
}


@pytest.mark.parametrize("name", sorted(DUPLICATE_KEYS))
def test_duplicate_keys_are_refused(tmp_path, name):
    text, fragment = DUPLICATE_KEYS[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(Dsr1Error) as err:
        read_config_file(path)
    msg = str(err.value)
    assert "\n" not in msg and f"config file '{path}'" in msg and fragment in msg and "keep one" in msg


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {name: paged}\nkvcache:\n  <<: *b\n  name: contiguous\n")
    assert read_config_file(path)["kvcache"] == {"name": "contiguous"}


@pytest.mark.parametrize("content", ["", "   \n", "# only a comment\n"])
def test_empty_config_file(tmp_path, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    with pytest.raises(Dsr1Error, match="is empty"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(Dsr1Error, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_plugin_option_names_key_path(with_plugins):
    with_plugins("options")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().make("attention", PluginChoice(name="windowed", options={"windw": 8}))
    assert str(err.value) == "unknown config key 'attention.options.windw'; did you mean 'window'?"


def test_plugin_option_out_of_range(with_plugins):
    with_plugins("options")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().make("attention", PluginChoice(name="windowed", options={"window": 0}))
    assert "invalid config value at 'attention.options.window'" in str(err.value)
    assert "greater than or equal to 1" in str(err.value) and "(got 0)" in str(err.value)


def test_plugin_options_validated_into_model(with_plugins):
    with_plugins("options")
    attn = PluginRegistry().make("attention", PluginChoice(name="windowed", options={"window": 64}))
    assert attn.options.window == 64


names = st.sampled_from(["sdpa", "eager", "linear", "sliding", "cpu", "cuda", "int8", "paged"])
choices = st.one_of(names, st.builds(lambda n, w: {"name": n, "options": {"window": w}}, names, st.integers(1, 9)))


@given(st.dictionaries(st.sampled_from(FAMILIES), choices, max_size=6))
def test_configs_round_trip_through_json(data):
    cfg = load_config(data)
    again = EngineConfig.model_validate_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json()) == json.loads(again.to_json())

"""Discovery, loading by name, duplicate names, hook validation, API versions."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1.specs import PluginSpec
from tests.conftest import run_cli


def test_discovery_imports_nothing(with_plugins):
    env = with_plugins("good", "broken")
    code = (
        "import sys; from dsr1.registry import PluginRegistry; r = PluginRegistry(); "
        "infos = r.discover(); "
        "bad = sorted(m for m in sys.modules if m.startswith(('dsr1_', 'torch')) or m.startswith('dsr1.models')); "
        "print(len(infos), bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    count, imported = out.split(" ", 1)
    assert int(count) >= 2
    assert imported.strip() == "[]"


def test_discover_reports_distribution_and_version(with_plugins):
    with_plugins("good")
    info = next(i for i in PluginRegistry().discover("attention") if i.name == "toy")
    assert (info.distribution, info.version, info.value) == ("dsr1-test-good", "0.0.1", "dsr1_test_good")


def test_seed_shaped_plugin_loads_and_runs(with_plugins):
    import torch

    with_plugins("good")
    spec = PluginRegistry().load("attention", "toy")
    assert isinstance(spec, PluginSpec) and spec.name == "toy"
    attn = spec.make()
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attn(q, k, v), expected)


def test_unknown_name_suggests_closest_and_pip_hint(with_plugins):
    with_plugins("good")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().load("attention", "tyo")
    msg = str(err.value)
    assert "no attention plugin named 'tyo'" in msg
    assert "did you mean 'toy'" in msg
    assert "pip install" not in msg  # 'tyo' is published by nobody: no guessed distribution name
    assert "\n" not in msg


def test_unknown_family():
    with pytest.raises(Dsr1Error, match="unknown plugin family 'atention'; did you mean 'attention'"):
        PluginRegistry().load("atention", "sdpa")


def test_broken_plugin_names_plugin_distribution_cause_and_fix(with_plugins):
    with_plugins("good", "broken")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().load("attention", "broken")
    msg = str(err.value)
    assert "attention plugin 'broken' from dsr1-test-broken 0.0.1 failed to import" in msg
    assert "ImportError: simulated failure: libbroken.so not found" in msg
    assert "toy" in msg  # installed alternatives
    assert "pip install --force-reinstall dsr1-test-broken" in msg


def test_broken_plugin_does_not_affect_others(with_plugins):
    with_plugins("good", "broken")
    registry = PluginRegistry()
    assert registry.load("attention", "toy").name == "toy"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("badsig", "has an invalid hook"),
        ("misspelled", "has an invalid hook: unknown hook 'dsr1_atention'"),
        ("oldapi", "declares plugin API version 99, but this dsr1 supports 1"),
        ("wrongname", "returned 'other', not a PluginSpec named 'wrongname'"),
        ("notattention", "is not a subclass of dsr1.interfaces.AttentionMechanism"),
    ],
)
def test_invalid_plugins_fail_loudly(with_plugins, name, expected):
    with_plugins("badhooks")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().load("attention", name)
    assert expected in str(err.value)
    assert "dsr1-test-badhooks 0.0.1" in str(err.value)


def test_two_plugins_claiming_one_name_is_an_error(with_plugins):
    with_plugins("good", "dupe")
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry().load("attention", "toy")
    assert "two plugins claim attention 'toy'" in str(err.value)
    assert "dsr1-test-good 0.0.1" in str(err.value) and "dsr1-test-dupe 0.0.1" in str(err.value)
    assert "overrides=True" in str(err.value)


def test_declared_override_wins(with_plugins):
    with_plugins("dupe")
    registry = PluginRegistry()
    spec = registry.load("attention", "eager")
    assert spec.impl.__name__ == "OverridingEager"
    assert registry.origin("attention", "eager").distribution == "dsr1-test-dupe"


def test_allowlist_blocks_unlisted_plugins(with_plugins):
    with_plugins("good")
    registry = PluginRegistry.from_env({"DSR1_PLUGINS": "sdpa,cpu"})
    with pytest.raises(Dsr1Error, match="installed but not in DSR1_PLUGINS"):
        registry.load("attention", "toy")
    assert PluginRegistry.from_env({"DSR1_PLUGINS": "toy"}).load("attention", "toy").name == "toy"


def test_each_registry_is_independent(with_plugins):
    with_plugins("good")
    first, second = PluginRegistry(), PluginRegistry()
    first.load("attention", "toy")
    assert first.pm.get_plugins() and not second.pm.get_plugins()


def test_debug_tracing_writes_hook_calls(with_plugins, capsys):
    with_plugins("good")
    PluginRegistry.from_env({"DSR1_DEBUG_PLUGINS": "1"}).load("attention", "toy")
    assert "dsr1_attention" in capsys.readouterr().err


def test_plugins_list_survives_broken_plugins(with_plugins):
    env = with_plugins("good", "broken", "badhooks", "dupe", "options")
    proc = run_cli("plugins", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["name"], r["distribution"]): r for r in json.loads(proc.stdout)["plugins"]}
    assert rows[("windowed", "dsr1-test-options")]["status"] == "ok"
    assert rows[("toy", "dsr1-test-good")]["status"] == "broken"
    assert "two plugins claim attention 'toy'" in rows[("toy", "dsr1-test-good")]["reason"]
    assert rows[("broken", "dsr1-test-broken")]["status"] == "broken"
    assert "simulated failure" in rows[("broken", "dsr1-test-broken")]["reason"]
    assert rows[("oldapi", "dsr1-test-badhooks")]["status"] == "broken"
    text = run_cli("plugins", "list", env=env)
    assert text.returncode == 0 and "broken: attention plugin 'broken'" in text.stdout


def test_plugins_list_no_load_imports_nothing(with_plugins):
    env = with_plugins("broken")
    proc = run_cli("plugins", "list", "--no-load", "--json", env=env)
    assert proc.returncode == 0
    rows = json.loads(proc.stdout)["plugins"]
    assert {r["status"] for r in rows} == {"not loaded"}
    assert any(r["name"] == "broken" for r in rows)


def test_selecting_broken_plugin_from_cli_is_one_line(with_plugins, tmp_path):
    env = with_plugins("broken")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attention: broken\n")
    proc = run_cli("config", "check", str(cfg), env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "failed to import" in proc.stderr
    debug = run_cli("--debug", "config", "check", str(cfg), env=env)
    assert "Traceback" in debug.stderr


def test_resolving_a_config_imports_only_selected_plugins():
    code = (
        "import sys; from dsr1.config import load_config; from dsr1.registry import PluginRegistry; "
        "p = PluginRegistry().resolve(load_config(attention='eager')); "
        "print(type(p.attention).__name__, sorted(m for m in sys.modules if m.startswith('dsr1_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == "EagerAttention"
    imported = out[1]
    assert "dsr1_attention_eager" in imported and "dsr1_device_cpu" in imported
    for unselected in ("dsr1_attention_sdpa", "dsr1_device_cuda", "dsr1_device_mlu", "dsr1_quant_float",
                       "dsr1_pruning_magnitude"):
        assert unselected not in imported


def test_lifecycle_events_reach_plugins(with_plugins):
    with_plugins("options")
    from dsr1.config import load_config

    pipeline = PluginRegistry().resolve(load_config(attention={"name": "windowed", "options": {"window": 4}}))
    pipeline.fire_step_finished({"new_tokens": 3})
    import dsr1_test_options as mod

    assert mod.STEPS == [{"new_tokens": 3}]

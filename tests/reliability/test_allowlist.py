"""The plugin allow-list (``DSR1_PLUGINS``) is a boundary: what it does not allow is never imported.

The ``sentinel`` test package (tests/plugins/sentinel) appends the name of each of its modules
to the file named by ``DSR1_TEST_SENTINEL`` when that module is imported, so a test sees
whether its code ran, in process and in a ``dsr1`` subprocess. It registers an unlisted
attention plugin (``sentinel``), a second ``attention:sdpa`` (also registered by
dsr1-attention-sdpa) and a second ``graph:eager`` (a builtin of the core).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry, parse_allowlist
from tests.conftest import run_cli


@pytest.fixture
def sentinel(with_plugins, tmp_path, monkeypatch):
    """Activates the sentinel package; returns (subprocess env, the file its imports write to)."""
    marks = tmp_path / "imported.txt"
    monkeypatch.setenv("DSR1_TEST_SENTINEL", str(marks))
    monkeypatch.delenv("DSR1_PLUGINS", raising=False)
    env = with_plugins("sentinel")
    env["DSR1_TEST_SENTINEL"] = str(marks)
    env.pop("DSR1_PLUGINS", None)
    return env, marks


def imported(marks: Path) -> list[str]:
    return marks.read_text().split() if marks.exists() else []


def test_sentinel_records_imports(sentinel):
    """The control: without an allow-list, `dsr1 plugins list` imports every plugin, the sentinel's too."""
    env, marks = sentinel
    proc = run_cli("plugins", "list", "--json", "--family", "attention", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "dsr1_test_sentinel.attention" in imported(marks)


# --- one meaning for each value of DSR1_PLUGINS ---------------------------------------------------

PARSES = {
    "unset": (None, None),
    "empty": ("", []),
    "blank": ("   ", []),
    "only separators": (" , ,\t", []),
    "commas": ("sdpa,cpu", ["sdpa", "cpu"]),
    "mixed separators": (" sdpa, attention:eager  dsr1-test-good ,", ["sdpa", "attention:eager", "dsr1-test-good"]),
}


@pytest.mark.parametrize("case", PARSES)
def test_parse_allowlist(case):
    value, expected = PARSES[case]
    assert parse_allowlist(value) == expected


@pytest.mark.parametrize("value", ["", "  ", ",", " ,\n"])
def test_empty_and_blank_both_mean_only_core_builtins(value, sentinel):
    _, marks = sentinel
    registry = PluginRegistry.from_env({"DSR1_PLUGINS": value})
    with pytest.raises(Dsr1Error) as err:
        registry.load("attention", "sdpa")
    assert "set but empty: only the core's builtins may load" in str(err.value)
    assert registry.load("graph", "eager").impl.__module__ == "dsr1.graph.eager"  # the core's, not the shadow
    assert imported(marks) == []


def test_unset_allows_every_installed_plugin(sentinel):
    _, marks = sentinel
    spec = PluginRegistry.from_env({}).load("attention", "sentinel")
    assert spec.name == "sentinel" and "dsr1_test_sentinel.attention" in imported(marks)


@pytest.mark.parametrize("entry", ["sentinel", "attention:sentinel", "dsr1-test-sentinel", "DSR1_Test.Sentinel"])
def test_entry_forms_that_allow_a_plugin(entry, sentinel):
    registry = PluginRegistry(allowlist=[entry])
    assert registry.load("attention", "sentinel").name == "sentinel"
    assert registry.origin("attention", "sentinel").distribution == "dsr1-test-sentinel"


@pytest.mark.parametrize("entry", ["device:sentinel", "dsr1-test-good", "sentinel2", "Sentinel"])
def test_entries_that_do_not_allow_it(entry, sentinel):
    _, marks = sentinel
    with pytest.raises(Dsr1Error, match=r"'sentinel' \(from dsr1-test-sentinel\) is installed but not in DSR1_PLUGINS"):
        PluginRegistry(allowlist=[entry]).load("attention", "sentinel")
    assert imported(marks) == []


def test_entry_with_unknown_family_is_one_line_error():
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry.from_env({"DSR1_PLUGINS": "sdpa,atention:sdpa"})
    assert "DSR1_PLUGINS entry 'atention:sdpa'" in str(err.value) and "did you mean 'attention'" in str(err.value)
    assert "\n" not in str(err.value)


# --- duplicates are refused before either is imported ---------------------------------------------

def test_second_distribution_claiming_an_allowed_name_is_refused_before_import(sentinel):
    _, marks = sentinel
    with pytest.raises(Dsr1Error) as err:
        PluginRegistry(allowlist=["sdpa", "cpu"]).load("attention", "sdpa")
    msg = str(err.value)
    assert "two plugins claim attention 'sdpa'" in msg and "neither was imported" in msg
    assert "dsr1-attention-sdpa 0.1.0" in msg and "dsr1-test-sentinel 0.0.1" in msg
    assert "\n" not in msg
    assert imported(marks) == []
    assert "dsr1_test_sentinel.sdpa" not in sys.modules


def test_family_name_entry_is_still_ambiguous(sentinel):
    _, marks = sentinel
    with pytest.raises(Dsr1Error, match="two plugins claim attention 'sdpa'"):
        PluginRegistry(allowlist=["attention:sdpa"]).load("attention", "sdpa")
    assert imported(marks) == []


def test_a_distribution_entry_picks_the_trusted_claimant(sentinel):
    _, marks = sentinel
    registry = PluginRegistry(allowlist=["dsr1-attention-sdpa"])
    registry.load("attention", "sdpa")
    assert registry.origin("attention", "sdpa").distribution == "dsr1-attention-sdpa"
    assert imported(marks) == []
    other = PluginRegistry(allowlist=["dsr1_test_sentinel"])
    assert other.load("attention", "sdpa").impl.__name__ == "ImpostorSdpa"
    assert other.origin("attention", "sdpa").distribution == "dsr1-test-sentinel"


def test_shadow_of_a_core_builtin_is_not_imported_unless_listed(sentinel):
    _, marks = sentinel
    registry = PluginRegistry(allowlist=["sdpa"])
    assert registry.load("graph", "eager").impl.__name__ == "EagerGraph"
    assert registry.origin("graph", "eager").distribution == "dsr1"
    assert imported(marks) == []


# --- the CLI: list and check ----------------------------------------------------------------------

def test_plugins_list_under_allowlist_imports_nothing_unlisted(sentinel):
    env, marks = sentinel
    for value in ("sdpa,cpu", "  "):
        proc = run_cli("plugins", "list", "--json", env={**env, "DSR1_PLUGINS": value})
        assert proc.returncode == 0, proc.stderr
        rows = {(r["family"], r["name"], r["distribution"]): r for r in json.loads(proc.stdout)["plugins"]}
        assert rows[("attention", "sentinel", "dsr1-test-sentinel")]["status"] == "not allowed"
        assert rows[("graph", "eager", "dsr1-test-sentinel")]["status"] == "not allowed"
        assert rows[("graph", "eager", "dsr1")]["status"] == "ok"  # core builtins: always allowed, listed as ok
        assert rows[("attention", "eager", "dsr1-attention-eager")]["status"] == "not allowed"
        sdpa = rows[("attention", "sdpa", "dsr1-test-sentinel")]
        if value.strip():  # allowed by name, claimed twice: refused from metadata
            assert sdpa["status"] == "broken" and "neither was imported" in sdpa["reason"]
        else:
            assert sdpa["status"] == "not allowed"
        assert imported(marks) == [], value
    text = run_cli("plugins", "list", "--no-load", env={**env, "DSR1_PLUGINS": "sdpa"})
    assert "not allowed: not in DSR1_PLUGINS (sdpa)" in text.stdout
    assert imported(marks) == []


def test_config_check_refuses_ambiguous_name_in_one_line(sentinel, tmp_path):
    env, marks = sentinel
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attention: sdpa\ndevice: cpu\n")
    proc = run_cli("config", "check", str(cfg), env={**env, "DSR1_PLUGINS": "sdpa,cpu"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("dsr1: error: two plugins claim attention 'sdpa'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert imported(marks) == []
    ok = run_cli("config", "check", str(cfg), env={**env, "DSR1_PLUGINS": "dsr1-attention-sdpa,dsr1-device-cpu"})
    assert ok.returncode == 0, ok.stderr
    assert imported(marks) == []


def test_an_entry_that_names_nothing_installed_is_warned_about_once() -> None:
    """A typo in DSR1_PLUGINS allows nothing and keeps the plugin it meant out: said once per process, not an
    error (an allow-list may name a plugin that is installed later)."""
    import warnings

    from dsr1 import registry as reg
    from dsr1.registry import PluginRegistry

    env = {"DSR1_PLUGINS": "sdpa,cpu,nosuchplugin,attention:nosuch,dsr1-attention-sdpa"}
    reg._CHECKED_ALLOWLISTS.discard(frozenset(reg.parse_allowlist(env["DSR1_PLUGINS"])))  # as in a new process
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert PluginRegistry.from_env(env).unmatched() == ["attention:nosuch", "nosuchplugin"]
        PluginRegistry.from_env(env)
    messages = [str(w.message) for w in seen if "DSR1_PLUGINS entry" in str(w.message)]
    assert len(messages) == 2 and "'attention:nosuch' names no installed plugin" in messages[0]

"""The kit's import check runs each plugin in a fresh process (a fork of a helper that has only
imported torch): a plugin that imports a vendor runtime at import time must be caught, one that
does not must pass, and a report must not leak from one plugin to the next."""
from __future__ import annotations

from pathlib import Path

import pytest

from dsr1_sdk.testing.isolation import import_report, runtime_problems

PLUGIN = '''
{runtime_import}
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec


class Attention(AttentionMechanism):
    def forward(self, query, key, value):
        return value


@hookimpl
def dsr1_attention():
    return PluginSpec(name="{name}", family="attention", impl=Attention, description="isolation test plugin")
'''


def _package(root: Path, name: str, runtime_import: str) -> None:
    """An installed-looking distribution: the module and a dist-info with its entry point."""
    module = f"dsr1_test_{name}"
    (root / f"{module}.py").write_text(PLUGIN.format(runtime_import=runtime_import, name=name), encoding="utf-8")
    info = root / f"dsr1_test_{name}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dsr1-test-{name}\nVersion: 0.0.1\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[dsr1.attention]\n{name} = {module}\n", encoding="utf-8")


def test_a_plugin_importing_a_vendor_runtime_is_caught_and_a_clean_one_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "torch_npu.py").write_text("# stands in for Ascend's torch extension\n", encoding="utf-8")
    _package(tmp_path, "leaky", "import torch_npu  # noqa: F401 - the fault under test")
    _package(tmp_path, "clean", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DSR1_PLUGINS", raising=False)
    leaky = import_report("attention", "leaky")
    assert runtime_problems(leaky["after_import"], None, "importing the plugin") == [
        "importing the plugin imported the npu runtime 'torch_npu'"]
    clean = import_report("attention", "clean")  # asked after the leaky one: its fork starts clean
    assert runtime_problems(clean["after_import"], None, "importing the plugin") == []
    assert clean["after_import"]["torch_imported"]

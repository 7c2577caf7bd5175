"""``pip install dsr1-device-mlu`` into a venv that has only the core adds ``mlu`` to
``dsr1 plugins list`` as unavailable here, with the reason; uninstalling removes it.

The venv is :func:`tests.venvkit.core_venv`, shared with the other install tests of the
session; this test leaves it as it found it (the SDK wheel aside, which every plugin needs).
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.venvkit import REPO, core_venv, pip, plugin_rows

pytestmark = pytest.mark.slow


def _mlu_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["family"] == "device" and r["name"] == "mlu"]


def test_install_lists_mlu_unavailable_then_uninstall_removes_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    env = core_venv(tmp_path_factory)
    sdk, mlu = env.wheel(REPO / "sdk"), env.wheel(REPO / "plugins" / "devices" / "mlu")
    assert not _mlu_rows(plugin_rows(env.python)), "the core alone must not know an mlu device"

    pip(env.python, "install", "--no-deps", "--no-index", str(sdk), str(mlu))
    try:
        rows = _mlu_rows(plugin_rows(env.python))
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["family"], row["name"], row["status"]) == ("device", "mlu", "unavailable")
        assert (row["distribution"], row["version"]) == ("dsr1-device-mlu", "0.1.0")
        assert row["reason"].startswith("torch_mlu is not installed (pip install torch_mlu from Cambricon's channel")
        assert "collective:cncl" in row["capabilities"]
    finally:
        pip(env.python, "uninstall", "-y", "dsr1-device-mlu")
    assert not _mlu_rows(plugin_rows(env.python)), "uninstalling dsr1-device-mlu must remove it from the list"

"""A plugin distribution installs into, and uninstalls from, a venv that has only the core.

The fresh venv (:mod:`tests.venvkit`) reuses this environment's already-installed
third-party packages (torch and the core's other requirements) through a directory of
symlinks on a ``.pth`` line, so the test needs no network and stays quick; the dsr1
distributions themselves are built as wheels and installed with pip.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.venvkit import core_venv
from tests.venvkit import listed as _listed
from tests.venvkit import pip as _pip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    env = core_venv(tmp_path_factory)  # shared with the other install tests of this session
    sdk = env.wheel(REPO / "sdk")
    sdpa = env.wheel(REPO / "plugins" / "attention" / "sdpa")
    return {"python": env.python, "sdk": sdk, "sdpa": sdpa}


def _select(py: Path) -> subprocess.CompletedProcess[str]:
    code = "from dsr1.registry import PluginRegistry; print(PluginRegistry().load('attention', 'sdpa').impl.__name__)"
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True)


def test_install_list_select_uninstall(fresh_env):
    py = fresh_env["python"]
    assert not any(name == "sdpa" for _, name, _ in _listed(py))
    before = _select(py)
    assert before.returncode != 0
    assert "no attention plugin named 'sdpa'" in before.stderr
    assert "pip install dsr1-attention-sdpa" in before.stderr

    _pip(py, "install", "--no-deps", "--no-index", str(fresh_env["sdk"]), str(fresh_env["sdpa"]))
    assert ("attention", "sdpa", "ok") in _listed(py)
    after = _select(py)
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "SdpaAttention"

    _pip(py, "uninstall", "-y", "dsr1-attention-sdpa")
    assert not any(name == "sdpa" for _, name, _ in _listed(py))
    assert _select(py).returncode != 0

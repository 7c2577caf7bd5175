"""A plugin distribution installs into, and uninstalls from, a venv that has only the core.

The fresh venv reuses this environment's already-installed third-party packages (torch
and the core's other requirements) through a directory of symlinks on a ``.pth`` line,
so the test needs no network and stays quick; the dsr1 distributions themselves are
built as wheels and installed with pip.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from pathlib import Path

import importlib_metadata
import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _requirement_closure(root: str) -> set[str]:
    """Names of the installed distributions ``root`` needs (excluding ``root``)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        dist = importlib_metadata.distribution(todo.pop())
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _link_dependencies(target: Path) -> None:
    """Symlink the top-level files of the core's requirements into ``target``."""
    target.mkdir()
    for name in _requirement_closure("dsr1"):
        dist = importlib_metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(str(dist.locate_file(top)))
            if top in ("..", "bin") or not src.exists() or (target / top).exists():
                continue
            (target / top).symlink_to(src)


def _wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True,
    )
    project = re.sub(r"[-.]+", "_", _project_name(source))
    return next(out.glob(f"{project}-*.whl"))


def _project_name(source: Path) -> str:
    import tomllib

    return tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"]


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fresh")
    wheels = root / "wheels"
    core = _wheel(REPO, wheels)
    sdk = _wheel(REPO / "sdk", wheels)
    sdpa = _wheel(REPO / "plugins" / "attention" / "sdpa", wheels)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )
    _link_dependencies(root / "deps")
    (purelib / "zz_dsr1_test_deps.pth").write_text(str(root / "deps") + "\n")
    _pip(py, "install", "--no-deps", "--no-index", str(core))
    return {"python": py, "sdk": sdk, "sdpa": sdpa}


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True,
                   capture_output=True)


def _listed(py: Path) -> set[tuple[str, str, str]]:
    out = subprocess.run([str(py), "-m", "dsr1.cli", "plugins", "list", "--json"], check=True,
                         capture_output=True, text=True).stdout
    return {(r["family"], r["name"], r["status"]) for r in json.loads(out)["plugins"]}


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

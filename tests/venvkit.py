"""A fresh virtual environment that holds only the dsr1 core, for install/uninstall tests.

The venv reuses this environment's already-installed third-party packages (torch and the
core's other requirements) through a directory of symlinks on a ``.pth`` line, so it needs
no network and stays quick; the dsr1 distributions themselves are built as wheels and
installed with pip. :func:`core_venv` builds one per test session and every test module
shares it: tests install their plugin, check it, and uninstall it again.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import importlib_metadata
import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def requirement_closure(root: str) -> set[str]:
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


def link_dependencies(target: Path) -> None:
    """Symlink the top-level files of the core's requirements into ``target``."""
    target.mkdir()
    for name in requirement_closure("dsr1"):
        dist = importlib_metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(str(dist.locate_file(top)))
            if top in ("..", "bin") or not src.exists() or (target / top).exists():
                continue
            (target / top).symlink_to(src)


def project_name(source: Path) -> str:
    import tomllib

    return str(tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"])


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` of the project in ``source`` (no deps, no isolation) into ``out``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True,
    )
    project = re.sub(r"[-.]+", "_", project_name(source))
    return next(out.glob(f"{project}-*.whl"))


def pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True,
                   capture_output=True)


def plugin_rows(py: Path) -> list[dict[str, Any]]:
    """The rows of ``dsr1 plugins list --json`` run with ``py``."""
    out = subprocess.run([str(py), "-m", "dsr1.cli", "plugins", "list", "--json"], check=True,
                         capture_output=True, text=True).stdout
    rows: list[dict[str, Any]] = json.loads(out)["plugins"]
    return rows


def listed(py: Path) -> set[tuple[str, str, str]]:
    """``(family, name, status)`` of every plugin ``dsr1 plugins list`` shows."""
    return {(r["family"], r["name"], r["status"]) for r in plugin_rows(py)}


@dataclass
class CoreVenv:
    """A venv with only the core installed; wheels of repo projects built on demand, once."""

    root: Path
    python: Path
    wheels: Path
    _built: dict[Path, Path] = field(default_factory=dict)

    def wheel(self, source: Path) -> Path:
        """The wheel of the project in ``source`` (built on first request)."""
        if source not in self._built:
            self._built[source] = build_wheel(source, self.wheels)
        return self._built[source]


_SESSION: dict[str, CoreVenv] = {}


def core_venv(tmp_path_factory: pytest.TempPathFactory) -> CoreVenv:
    """The session's core-only venv, created on first use."""
    if "core" in _SESSION:
        return _SESSION["core"]
    root = tmp_path_factory.mktemp("fresh")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )
    link_dependencies(root / "deps")
    (purelib / "zz_dsr1_test_deps.pth").write_text(str(root / "deps") + "\n")
    env = CoreVenv(root=root, python=py, wheels=root / "wheels")
    pip(py, "install", "--no-deps", "--no-index", str(env.wheel(REPO)))
    _SESSION["core"] = env
    return env

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import importlib_metadata
import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure_of(requires: list[str], skip: frozenset[str] = frozenset()) -> set[str]:
    """Names of the installed distributions that ``requires`` (``Requires-Dist`` lines, without
    extras) need, followed through this environment's metadata; names in ``skip`` are neither
    returned nor followed."""
    seen: set[str] = set()
    todo = list(requires)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = normalize(req.name)
        if name in seen or name in skip:
            continue
        seen.add(name)
        todo += importlib_metadata.distribution(name).requires or []
    return seen


def requirement_closure(root: str) -> set[str]:
    """Names of the installed distributions ``root`` needs (excluding ``root``)."""
    return closure_of(importlib_metadata.distribution(root).requires or [], skip=frozenset({normalize(root)}))


def link_dependencies(target: Path) -> None:
    """Symlink the top-level files of the core's third-party requirements into ``target`` (dsr1's own
    distributions that the core requires, its default plugins, are left out: the tests install them
    from wheels)."""
    link_distributions({n for n in requirement_closure("dsr1") if not n.startswith("dsr1")}, target)


def link_distributions(names: set[str], target: Path) -> None:
    """Symlink the top-level files of the installed distributions ``names`` into ``target`` (a new
    directory that a ``.pth`` line then puts on a venv's path: only these distributions show)."""
    target.mkdir()
    for name in sorted(names):
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


_WHEELS: dict[Path, Path] = {}


def session_wheel(source: Path, out: Path) -> Path:
    """The wheel of the project in ``source``, built once per test session (into ``out`` the first time):
    the core's alone takes seconds (its bundled models), and several test modules install it."""
    source = source.resolve()
    if source not in _WHEELS:
        _WHEELS[source] = build_wheel(source, out)
    return _WHEELS[source]


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

    def wheel(self, source: Path) -> Path:
        """The wheel of the project in ``source`` (built on first request in the session)."""
        return session_wheel(source, self.wheels)


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

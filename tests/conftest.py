"""Shared fixtures: test-only plugin packages installed into private target dirs.

The packages in tests/plugins/ are real installable distributions. Each is installed
once per session with ``pip install --target`` into its own directory; a test that
wants one puts that directory on ``sys.path`` (and on ``PYTHONPATH`` for subprocesses),
so the rest of the suite and ``make demo`` never see them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_PLUGINS = REPO / "tests" / "plugins"

# The cpu device caches its compiled panel kernel under $DSR1_HOME/kernels unless TORCH_EXTENSIONS_DIR is set;
# tests that point DSR1_HOME at a private directory would each rebuild it (tens of seconds on AVX-512 CPUs), so
# the whole run, subprocesses included, shares the cache `make install` filled.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path(os.environ.get("DSR1_HOME") or Path.home() / ".cache" / "dsr1").expanduser() / "kernels"))


@pytest.fixture(scope="session")
def installed_test_plugins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Install every package in tests/plugins/ into its own target dir; name → dir."""
    root = tmp_path_factory.mktemp("test-plugins")
    targets: dict[str, Path] = {}
    for pkg in sorted(p for p in TEST_PLUGINS.iterdir() if (p / "pyproject.toml").exists()):
        target = root / pkg.name
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-build-isolation", "--target", str(target), str(pkg)],
            check=True,
            capture_output=True,
        )
        targets[pkg.name] = target
    return targets


@pytest.fixture
def with_plugins(
    installed_test_plugins: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., dict[str, str]]]:
    """``with_plugins("good", "broken")`` makes those packages visible to this test (in
    process and to subprocesses); returns the environment for subprocesses."""
    added: list[str] = []

    def activate(*names: str) -> dict[str, str]:
        for name in names:
            path = str(installed_test_plugins[name])
            monkeypatch.syspath_prepend(path)
            added.append(path)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*added, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
        return env

    yield activate
    for mod in [m for m in sys.modules if m.startswith("dsr1_test_")]:
        del sys.modules[mod]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``dsr1`` CLI in a subprocess with this interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "dsr1.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )

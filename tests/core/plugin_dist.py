"""A one-module plugin distribution written into a test's own directory.

The registry finds plugins only through entry points, so a test that needs a plugin of a
family that ``tests/plugins/`` has none of (a second monitor, a spying pool, a model builder
for a made-up ``model_type``) writes the module and a ``.dist-info`` beside it and puts the
directory on ``sys.path``: importlib-metadata sees a real distribution, for this test only.
"""
from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def write_plugin(root: Path, family: str, name: str, source: str) -> str:
    """Write module ``dsr1_test_<family>_<name>`` and a distribution ``dsr1-test-<family>-<name>``
    whose ``dsr1.<family>`` entry point ``name`` is that module; returns the module name."""
    module = f"dsr1_test_{family}_{name}".replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dsr1-test-{family}-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[dsr1.{family}]\n{name} = {module}\n")
    return module


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str, str], str]]:
    """``fake_plugin(family, name, source)``: install a plugin module for this test only."""
    root = tmp_path / "fake-plugins"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    written: list[str] = []

    def install(family: str, name: str, source: str) -> str:
        written.append(write_plugin(root, family, name, source))
        return written[-1]

    yield install
    for module in written:
        sys.modules.pop(module, None)

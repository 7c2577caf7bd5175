"""One run of every scaffold's generated tests, shared by ``test_scaffold.py`` and
``test_scaffold_decoding_kvcache.py``.

Each family's package is written by ``dsr1 plugins new`` (one through the CLI in a subprocess, as a plugin
author runs it; the others through the same ``main`` in this process), the broken copies are edited, and
all of them are installed with ``pip --no-deps --target`` (the kits load plugins through their entry
points, as the engine does) and tested in one pytest subprocess with one junit report. Building the
packages and starting pytest with torch are most of the cost, and they are the same for both modules.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsr1.cli import main

#: every scaffold family, installed as generated under the name ``demo``
DEMOS = ("attention", "device", "quant", "pruning", "decoding", "kvcache", "graph", "monitor", "scheduler")
#: the scaffold written through a real ``python -m dsr1.cli`` subprocess
BY_SUBPROCESS = "decoding"

#: The broken copies: name → (family, the generated line, what replaces it). Only their checks that must
#: catch the bug run (``KIT_SELECTION``), except the attention copy's, which runs its whole kit.
BREAKS: dict[str, tuple[str, str, str]] = {
    # attention without the scale
    "broken": ("attention", "scale = d**-0.5 if scale is None else scale", "scale = 1.0"),
    # declares min_p, and ignores it
    "nominp": ("decoding", "    if params.min_p > 0.0:\n", "    if False:  # min_p ignored\n"),
    # hands attention the keys where the values belong
    "kasv": ("kvcache", "        return k[:, :, :end], v[:, :, :end]", "        return k[:, :, :end], k[:, :, :end]"),
}
#: the demos and the attention copy run their whole kit; the decoding and kvcache copies only the checks that
#: must catch them (``-k`` matches module and directory names too)
KIT_SELECTION = "demo or broken or test_case or test_same_as_contiguous"


@dataclass
class KitRun:
    """The outcome of the generated tests: module → test name → ``passed`` / ``skipped`` / ``failed: <message>``."""

    results: dict[str, dict[str, str]]
    stdout: str


def scaffold(family: str, name: str, root: Path) -> Path:
    """``dsr1 plugins new`` (the CLI's ``main``; a real ``python -m dsr1.cli`` for ``BY_SUBPROCESS``'s demo)."""
    target = root / f"{family}-{name}"
    argv = ["plugins", "new", "--family", family, "--name", name, "--dir", str(target)]
    if family == BY_SUBPROCESS and name == "demo":
        run = subprocess.run([sys.executable, "-m", "dsr1.cli", *argv], capture_output=True, text=True, timeout=120)
        code, out, err = run.returncode, run.stdout, run.stderr
    else:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        out, err = stdout.getvalue(), stderr.getvalue()
    assert code == 0, err
    assert f"wrote plugin package dsr1-{family}-{name}" in out, out
    return target


def outcomes(report: Path) -> dict[str, dict[str, str]]:
    """module → test name → passed / failed: <message> / skipped, from a junit report."""
    results: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = next(p for p in case.get("classname", "").split(".") if p.startswith("test_"))
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        outcome = "failed: " + (failure.get("message") or "") if failure is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        results.setdefault(module, {})[case.get("name", "")] = outcome
    return results


@pytest.fixture(scope="session")
def kit_run(tmp_path_factory: pytest.TempPathFactory) -> KitRun:
    # the directory's name must not match KIT_SELECTION (no "demo", "broken", ...)
    root = tmp_path_factory.mktemp("scaffolds")
    dirs = [scaffold(family, "demo", root) for family in DEMOS]
    for name, (family, line, replacement) in BREAKS.items():
        broken = scaffold(family, name, root)
        module = broken / f"dsr1_{family}_{name}" / "__init__.py"
        source = module.read_text()
        assert source.count(line) == 1, f"the {family} template no longer has the line the test breaks"
        module.write_text(source.replace(line, replacement))
        dirs.append(broken)

    # two pips at once, half of the packages each: building a package is one core's work, and pytest waits
    sites = [root / "site-a", root / "site-b"]
    pips = [subprocess.Popen([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), *map(str, dirs[i::2])],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i, site in enumerate(sites)]
    for proc in pips:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out

    report = root / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, sites))}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         "-k", KIT_SELECTION, *(str(d / "tests") for d in dirs)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    return KitRun(results=outcomes(report), stdout=run.stdout)

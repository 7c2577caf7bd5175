"""Issue 20's done-when: third-party decoding and kvcache plugins from ``dsr1 plugins new``
pass their kits as generated, and deliberately broken copies fail them (the graph, monitor and
scheduler scaffolds ride along: they pass their kits too).

Follows ``test_scaffold.py``: the packages are written by the CLI into ``tmp_path``,
installed with ``pip --no-deps --target`` (the kit loads plugins through their entry points,
as the engine does) and their generated tests run in a pytest subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: The scaffolds that must pass their kit, and how many of its tests at least pass.
MIN_PASSED: dict[str, int] = {"decoding": 25, "kvcache": 15, "graph": 10, "monitor": 12, "scheduler": 20}
FAMILIES = tuple(MIN_PASSED)

#: The broken copies: (family, name, the generated line, what replaces it).
BREAKS: dict[str, tuple[str, str, str, str]] = {
    # declares min_p, and ignores it
    "decoding": ("decoding", "nominp", "    if params.min_p > 0.0:\n", "    if False:  # min_p ignored\n"),
    # hands attention the keys where the values belong
    "kvcache": ("kvcache", "kasv", "        return k[:, :, :end], v[:, :, :end]",
                "        return k[:, :, :end], k[:, :, :end]"),
}


def scaffold(family: str, name: str, root: Path) -> Path:
    """``dsr1 plugins new`` through the CLI, as a plugin author runs it."""
    target = root / f"{family}-{name}"
    run = subprocess.run([sys.executable, "-m", "dsr1.cli", "plugins", "new", "--family", family, "--name", name,
                          "--dir", str(target)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote plugin package dsr1-{family}-{name}" in run.stdout
    return target


def outcomes(report: Path) -> dict[str, dict[str, str]]:
    """module → test name → passed / failed / skipped, from a junit report."""
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


def test_scaffolded_decoding_and_kvcache_pass_and_broken_copies_fail(tmp_path: Path) -> None:
    dirs = [scaffold(family, "demo", tmp_path) for family in FAMILIES]
    for family, name, line, replacement in BREAKS.values():
        broken = scaffold(family, name, tmp_path)
        module = broken / f"dsr1_{family}_{name}" / "__init__.py"
        source = module.read_text()
        assert source.count(line) == 1, f"the {family} template no longer has the line the test breaks"
        module.write_text(source.replace(line, replacement))
        dirs.append(broken)

    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    subprocess.run([*pip, *map(str, dirs)], check=True, capture_output=True, text=True, timeout=300)

    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        # the demos run their whole kit; the broken copies only the checks that must catch them
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         "-k", "demo or test_case or test_same_as_contiguous",
         *(str(d / "tests") for d in dirs)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    results = outcomes(report)
    for family in FAMILIES:
        got = results[f"test_dsr1_{family}_demo"]
        failed = {k: v for k, v in got.items() if v.startswith("failed")}
        assert not failed and sum(v == "passed" for v in got.values()) >= MIN_PASSED[family], (
            family, failed, run.stdout[-3000:])

    decoding = results["test_dsr1_decoding_nominp"]
    assert decoding["test_case[min_p_0.2]"].startswith("failed") and "probability 0" in decoding["test_case[min_p_0.2]"]
    assert decoding["test_case[min_p_0.5_temperature_0.7]"].startswith("failed")
    assert decoding["test_case[top_k_3]"] == decoding["test_case[greedy]"] == "passed"  # the kit names the culprit

    kvcache = results["test_dsr1_kvcache_kasv"]
    assert all(kvcache[f"test_same_as_contiguous[{c}]"].startswith("failed") for c in ("prefill_decode", "padded_gqa"))
    assert "K/V differ from contiguous" in kvcache["test_same_as_contiguous[prefill_decode]"]

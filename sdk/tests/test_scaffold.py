"""``new_plugin`` writes packages that install and pass the conformance kit out of the box."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dsr1.errors import Dsr1Error
from dsr1_sdk.scaffold import SCAFFOLD_FAMILIES, class_prefix, new_plugin, render


def test_refuses_other_families_in_one_line() -> None:
    with pytest.raises(Dsr1Error) as err:
        new_plugin("pool", "mine", Path("unused"))
    assert str(err.value) == f"cannot scaffold a 'pool' plugin; supported families: {', '.join(SCAFFOLD_FAMILIES)}"


@pytest.mark.parametrize("name", ["Mine", "1st", "my_attn", "my--attn", "-x", "x-", "", "mine!"])
def test_refuses_invalid_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(Dsr1Error, match="invalid plugin name"):
        new_plugin("attention", name, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(Dsr1Error, match="not an empty directory"):
        new_plugin("pruning", "mine", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_plugin("pruning", "mine", empty) == empty


def test_names_follow_the_conventions(tmp_path: Path) -> None:
    root = new_plugin("attention", "my-attn2", tmp_path / "p")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "README.md", "dsr1_attention_my_attn2/__init__.py", "pyproject.toml", "tests/test_dsr1_attention_my_attn2.py"
    ]
    pyproject = (root / "pyproject.toml").read_text()
    assert 'name = "dsr1-attention-my-attn2"' in pyproject
    assert '[project.entry-points."dsr1.attention"]\n"my-attn2" = "dsr1_attention_my_attn2"' in pyproject
    assert "class MyAttn2Attention(AttentionMechanism)" in (root / "dsr1_attention_my_attn2/__init__.py").read_text()
    assert class_prefix("flash-v2") == "FlashV2"


@pytest.mark.parametrize("family", list(SCAFFOLD_FAMILIES))
def test_generated_python_compiles(family: str) -> None:
    for path, text in render(family, "demo").items():
        if path.endswith(".py"):
            compile(text, path, "exec")


#: families installed here; decoding, kvcache, graph, monitor, scheduler: test_scaffold_decoding_kvcache.py
INSTALLED = ("attention", "device", "quant", "pruning")


def test_generated_plugins_install_and_pass_the_kit(tmp_path: Path) -> None:
    """All four families pass their kit; a broken copy (attention without the scale) fails it."""
    for family in INSTALLED:
        new_plugin(family, "demo", tmp_path / family)
    broken = new_plugin("attention", "broken", tmp_path / "broken")
    module = broken / "dsr1_attention_broken" / "__init__.py"
    source = module.read_text()
    assert "scale = d**-0.5 if scale is None else scale" in source
    module.write_text(source.replace("scale = d**-0.5 if scale is None else scale", "scale = 1.0"))

    target = tmp_path / "site"
    dirs = [str(tmp_path / f) for f in INSTALLED] + [str(broken)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, *dirs], check=True, capture_output=True, text=True, timeout=300)

    env = {**os.environ, "PYTHONPATH": str(target)}
    report = tmp_path / "report.xml"
    tests = [str(Path(d) / "tests") for d in dirs]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    results: dict[str, dict[str, int]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module_name = next(p for p in case.get("classname", "").split(".") if p.startswith("test_"))
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed"
        )
        results.setdefault(module_name, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
    for family in INSTALLED:
        counts = results[f"test_dsr1_{family}_demo"]
        assert counts["failed"] == 0 and counts["passed"] >= 15, (family, counts, run.stdout[-3000:])
    assert results["test_dsr1_attention_broken"]["failed"] >= 10, results
    assert "test_case[prefill_mha]" in run.stdout and "max |diff|" in run.stdout

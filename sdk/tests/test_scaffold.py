"""``new_plugin`` writes packages that install and pass the conformance kit out of the box."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


#: the families this module checks; the other five: test_scaffold_decoding_kvcache.py
INSTALLED = ("attention", "device", "quant", "pruning")


def test_generated_plugins_install_and_pass_the_kit(kit_run: Any) -> None:
    """All four families pass their kit; a broken copy (attention without the scale) fails it.

    ``kit_run`` (conftest.py) scaffolded, pip-installed and tested every family, and the broken copies,
    in one pytest subprocess."""
    results: dict[str, dict[str, int]] = {}
    for module_name, cases in kit_run.results.items():
        for outcome in cases.values():
            kind = "failed" if outcome.startswith("failed") else outcome
            results.setdefault(module_name, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
    for family in INSTALLED:
        counts = results[f"test_dsr1_{family}_demo"]
        assert counts["failed"] == 0 and counts["passed"] >= 15, (family, counts, kit_run.stdout[-3000:])
    assert results["test_dsr1_attention_broken"]["failed"] >= 10, results
    assert "test_case[prefill_mha]" in kit_run.stdout
    # the failure names the case and shows the difference (other broken copies fail in the same run)
    broken = kit_run.results["test_dsr1_attention_broken"]["test_case[prefill_mha]"]
    assert broken.startswith("failed") and "max |diff|" in broken, broken

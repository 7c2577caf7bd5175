"""examples/prune.py: the seed's flags, dsr1's model resolution, the same code as ``dsr1 prune``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prune.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prune_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_command_names_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = example().main(["--model", "bert-base", "--target-sparsity", "0.5", "--pruning-strategy", "magnitude",
                           "--output-dir", str(tmp_path / "pruned_models")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("dsr1: error: model 'bert-base' not found; looked in: path 'bert-base'; ")
    assert "/models/bert-base" in err and "Hugging Face hub (skipped: HF_HUB_OFFLINE" in err
    assert not (tmp_path / "pruned_models").exists()


def test_seed_flags_run_the_same_code(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned_models"
    code = example().main(["--model", str(tiny_bert), "--target-sparsity", "0.5", "--pruning-strategy", "magnitude",
                           "--output-dir", str(out), "--no-speed", "--quiet", "--eval-sentences", "8"])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    assert r["command"].startswith("python examples/prune.py --model ") and r["stages"][0]["name"] == "stage-0.50"
    assert (out / "stage-0.50" / "config.json").is_file() and (out / "curve.png").is_file()

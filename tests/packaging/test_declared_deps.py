"""What a plain install lacks degrades or never was needed: the plot, scipy, the test tools, a checkout.

In process and fast; ``test_outside_checkout`` runs the same paths in a venv without those packages.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1 import corpus
from dsr1.tasks.prune import report as prune_report
from dsr1.pruning.metrics import average_ranks, spearman
from tests.venvkit import REPO

NOTE = "dsr1: note: curve.png needs matplotlib (pip install 'dsr1[plot]'); report.json and curve.csv are written"


def tiny_report() -> dict[str, Any]:
    point = {"name": "dense", "target_sparsity": 0.0, "realized_sparsity": 0.0, "params_fraction": 1.0,
             "prunable_nonzero": 10, "accuracy": {"perplexity": 5.0, "score": 5.0}}
    stage = {**point, "name": "stage-0.50", "target_sparsity": 0.5, "realized_sparsity": 0.5, "prunable_nonzero": 5}
    return {"dense": point, "stages": [stage], "model_kind": "causal", "model_name": "m",
            "strategy": {"name": "magnitude"}, "settings": {"device": "cpu"}}


def test_prune_report_without_matplotlib_writes_the_rest_and_notes_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    prune_report._note_once.cache_clear()
    for _ in range(3):  # the report is rewritten after every stage
        prune_report.write_all(tmp_path, tiny_report())
    assert capsys.readouterr().err.splitlines() == [NOTE]
    assert json.loads((tmp_path / "report.json").read_text())["stages"][0]["name"] == "stage-0.50"
    assert (tmp_path / "curve.csv").read_text().count("\n") == 3 and not (tmp_path / "curve.png").exists()
    prune_report._note_once.cache_clear()


def test_other_missing_modules_are_not_taken_for_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, report: dict[str, Any]) -> None:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(prune_report, "write_png", broken)
    with pytest.raises(ModuleNotFoundError, match="numpy"):
        prune_report.write_all(tmp_path, tiny_report())


def test_spearman_matches_scipy_without_needing_it() -> None:
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 17, 200):
        a = torch.randn(n, generator=gen, dtype=torch.float64)
        b = a + torch.randn(n, generator=gen, dtype=torch.float64)
        for x, y in [(a, b), (torch.round(a * 2), torch.round(b)), (a, -a)]:  # ties in the second pair
            want = float(stats.spearmanr(x.numpy(), y.numpy()).statistic)
            assert spearman(x, y) == pytest.approx(want, abs=1e-12), (n, x, y)


def test_average_ranks_share_ties() -> None:
    ranks = average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))  # a constant side: undefined, as in scipy


def test_shipped_corpus_is_the_text_dsr1_tiny_was_trained_on() -> None:
    import hashlib

    card = json.loads((REPO / "core/dsr1/assets/dsr1-tiny/dsr1_tiny.json").read_text())["corpus"]
    train, heldout = corpus.split_documents()
    assert hashlib.sha256("\n\n".join(train).encode()).hexdigest() == card["train_sha256"]
    assert hashlib.sha256("\n\n".join(heldout).encode()).hexdigest() == card["heldout_sha256"]
    assert corpus.info()["python_version"] == card["python_version"]
    assert (len(train), len(heldout)) == (card["train_documents"], card["heldout_documents"])


def test_a_missing_corpus_asset_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dsr1.errors import Dsr1Error

    monkeypatch.setattr(corpus, "ASSET", tmp_path / "nope.json.gz")
    corpus._load.cache_clear()
    with pytest.raises(Dsr1Error, match=r"default text .*nope.json.gz is missing \(a broken install: reinstall dsr1\)"):
        corpus.documents()
    corpus._load.cache_clear()


def test_toml_configs_read_on_python_3_10_through_tomli(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    from dsr1 import config

    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the same API, from PyPI on 3.10
    assert config._parse('attention = "sdpa"\n', ".toml", "x.toml") == {"attention": "sdpa"}
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ModuleNotFoundError):
        config._parse('attention = "sdpa"\n', ".toml", "x.toml")


def test_kits_without_hypothesis_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsr1_sdk.testing as testing  # importable with pytest alone: pytest loads its plugin module

    assert testing.KITS["attention"] == "AttentionConformance"
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # as if not installed
    message = r"^the dsr1 conformance kits need hypothesis: pip install 'dsr1-sdk\[testing\]'$"
    with pytest.raises(ImportError, match=message):
        testing.AttentionConformance  # noqa: B018 - the lookup is what is tested

"""``dsr1 bench precision`` (issue 20): quant unset and explicit policies from the same weights in one
process, rates from interleaved timings, the layers each ended with. The clock is replaced by one
whose ticks grow, so no figure here depends on how fast this machine is."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from dsr1.benchmarks import precision
from dsr1.benchmarks import shapes as bench
from dsr1.cli import main

SMALL = {**bench.SHAPES["tiny-125m"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128}


class _Clock:
    """``perf_counter`` stand-in: 0, 1, 4, 9, ... so each timed call lasts longer than the one before."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self.ticks) ** 2)


def test_precision_bench_compares_unset_and_fp32_on_the_same_layers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(bench.SHAPES, "test-small", SMALL)
    monkeypatch.setattr(precision, "time", _Clock())
    out = tmp_path / "r.json"
    assert main(["bench", "precision", "--shape", "test-small", "--batch-size", "1,2", "--prompt-len", "4",
                 "--new-tokens", "3", "--reps", "2", "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["command"].startswith("dsr1 bench precision --shape test-small --quant fp32")
    assert report["settings"]["quant"] == ["unset", "fp32"]
    pipelines = report["pipelines"]
    assert pipelines["unset"]["quant"]["name"] is None and pipelines["fp32"]["quant"]["name"] == "fp32"
    assert report["layers"]["fp32"] == report["layers"]["unset"]
    assert "Linear" not in report["layers"]["unset"]  # the device's kernel or oneDNN packing took every layer
    for row in report["results"]:
        assert set(row["ratio_vs_unset"]) == {"fp32"}
        for name in ("unset", "fp32"):
            assert len(row[name]["times_1"]) == 2 and row[name]["decode_tok_s"] > 0


def test_precision_bench_refuses_listing_unset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "precision", "--quant", "fp32,unset"]) == 2
    assert "always measured" in capsys.readouterr().err

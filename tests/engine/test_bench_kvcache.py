"""``dsr1 bench kvcache``: bad input is one line, a tiny run on dsr1-tiny gives a complete report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1.benchmarks import kvcache
from dsr1.cli import main

BAD = {
    "unknown cache": (["--caches", "contiguous,straeming"], "did you mean 'streaming'"),
    "bad context list": (["--context", "512,big"], "--context must be comma-separated integers"),
    "context too short": (["--context", "4"], "each ≥ 8"),
    "keep outside (0, 1]": (["--keep", "0.3,1.5"], "--keep must be fractions in (0, 1]"),
    "prefill share": (["--prefill-frac", "1"], "--prefill-frac must be in (0, 1)"),
    "eval text shorter than a window": (["--context", "2048", "--eval-tokens", "1000"], "must cover one window"),
    "option of an unlisted cache": (["--caches", "int8", "--cache-option", "streaming.window=8"], "not benchmarked"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    tail, expected = BAD[case]
    assert main(["bench", "kvcache", *tail]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsr1: error:") and expected in err and "\n" not in err


def test_budgets_keep_the_asked_share() -> None:
    assert kvcache.default_options("streaming", {"sinks", "window"}, 1024, 0.25) == {"sinks": 4, "window": 252}
    assert kvcache.default_options("heavy-hitter", {"budget", "recent"}, 1024, 0.25) == {"budget": 0.25,
                                                                                          "recent": 128}
    assert kvcache.default_options("int8", {"paged", "block_size"}, 1024, 0.25) == {}


def test_tiny_run_writes_a_complete_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "k.json", tmp_path / "k.png"
    argv = ["bench", "kvcache", "--context", "32,64", "--caches", "int8,streaming", "--keep", "0.5",
            "--eval-tokens", "128", "--json", "--output", str(out), "--plot", str(png)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text()) and png.stat().st_size > 0
    assert report["command"].startswith("dsr1 bench kvcache --model dsr1-tiny --context 32,64")
    assert report["machine"]["cpu"] and report["versions"]["torch"] and report["date"]
    assert report["model"]["dtype"] == "float32" and report["model"]["trained_context"] == 256  # its card's seq_len
    assert [(r["cache"], r["context"]) for r in report["results"]] == [
        (c, t) for t in (32, 64) for c in ("contiguous", "int8", "streaming@0.5")]
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["kv_bytes"] > 0 and row["decode_tok_s"] > 0 and 1 < row["perplexity"] < 4096
        assert 0 <= row["top1_agreement"] <= 1 and row["scored_tokens"] == row["samples"] * row["context"] // 2
        assert not row["beyond_trained_context"] and "other_processes_cpu_pct" in row
    base = [r for r in report["results"] if r["cache"] == "contiguous"]
    assert all(r["top1_agreement"] == 1.0 and r["kv_reduction"] == 1.0 for r in base)
    assert all(r["max_abs_logit_diff_vs_forward"] < 1e-3 for r in base)  # through the cache == cache-free forward
    stream = next(r for r in report["results"] if r["cache"] == "streaming@0.5" and r["context"] == 64)
    assert stream["options"] == {"sinks": 4, "window": 28} and stream["kv_reduction"] > 1.5
    assert report["targets"]["summary"][-1].startswith("target (>= 3x less KV")


def test_the_target_is_judged_within_the_trained_context_only() -> None:
    rows = [{"cache": "streaming@0.3", "context": c, "status": "ok", "kv_reduction": 3.3, "perplexity_increase": -0.3,
             "top1_agreement": 0.5, "beyond_trained_context": c > 256} for c in (256, 1024)]
    got = kvcache.target(rows)
    assert got["met_by"] == [{"cache": "streaming@0.3", "context": 256}]
    assert "not judged" in got["summary"][1]

"""``dsr1 bench attention``: the CLI form parses, bad input is one line, a tiny run gives a complete report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1.benchmarks import attention
from dsr1.cli import build_parser, main

BAD = {  # argv tail → what the one-line error says
    "unknown plugin": (["--plugins", "eagr"], "did you mean 'eager'"),
    "bad seq list": (["--seq", "1024,x"], "--seq must be comma-separated integers"),
    "empty seq list": (["--seq", ","], "--seq needs at least one value"),
    "heads not a multiple": (["--heads", "6", "--kv-heads", "4"], "must be a multiple of --kv-heads"),
    "zero heads": (["--heads", "0"], "--heads must be at least 1, got 0"),
    "zero kv heads": (["--kv-heads", "0"], "--kv-heads must be at least 1"),
    "zero head dim": (["--head-dim", "0"], "--head-dim must be at least 1"),
    "zero threads": (["--threads", "0"], "--threads must be at least 1"),
    "zero batch": (["--batch", "0"], "--batch must be at least 1"),
    "bad dtype": (["--dtype", "int8"], "--dtype must be"),
    "option of an unlisted plugin": (["--plugins", "eager", "--plugin-option", "sliding.window=8"],
                                     "not benchmarked"),
    "option without a name": (["--plugin-option", "window=8"], "NAME.KEY=VALUE"),
}


def test_forms_parse_beside_the_existing_bench() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "attention", "--plugins", "eager,sdpa", "--seq", "1024,4096", "--device",
                              "cuda", "--dtype", "bfloat16", "--json", "--plot", "m.png"])
    assert args.func.__wrapped__ is attention.run and args.plugins == "eager,sdpa" and args.device == "cuda"
    args = parser.parse_args(["bench", "kvcache", "--context", "512,1024", "--caches", "contiguous,int8"])
    assert args.func.__module__ == "dsr1.benchmarks.kvcache" and args.context == "512,1024"
    args = parser.parse_args(["bench", "--shape", "tiny-125m", "--random-weights"])
    assert args.bench_form is None and args.shape == "tiny-125m"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    tail, expected = BAD[case]
    assert main(["bench", "attention", *tail]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsr1: error:") and expected in err and "\n" not in err


def test_bench_without_source_or_form_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "dsr1 bench attention" in capsys.readouterr().err


def test_tiny_run_writes_a_complete_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    argv = ["bench", "attention", "--plugins", "eager,sdpa,linear", "--seq", "32,64", "--heads", "4", "--kv-heads",
            "2", "--head-dim", "16", "--ffn", "96", "--layer", "--reps", "1", "--mem-cap-gb", "2", "--json",
            "--output", str(out), "--plot", str(png)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text()) and png.stat().st_size > 0
    assert report["command"].startswith("dsr1 bench attention --plugins eager,sdpa,linear --seq 32,64")
    assert report["machine"]["cpu"] and report["versions"]["torch"] and report["date"]
    assert report["settings"]["heads"] == 4 and report["settings"]["threads"] == 1 and report["memory_method"]
    assert [(r["plugin"], r["seq"]) for r in report["results"]] == [
        (p, t) for p in ("eager", "sdpa", "linear") for t in (32, 64)]
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["peak_mem_bytes"] >= 0 and row["time_s"] > 0 and row["input_bytes"] == 2 * 4 * 16 * row["seq"] * 4
        assert "other_processes_cpu_pct" in row and row["layer_status"] == "ok" and row["layer_peak_mem_bytes"] >= 0 and row["layer_time_s"] > 0
    assert all("layer_peak_mem_vs_eager" in r for r in report["ratios"])
    assert {(r["plugin"], r["seq"]) for r in report["ratios"]} == {(p, t) for p in ("sdpa", "linear") for t in (32, 64)}
    assert report["target"]["seq"] == 64 and report["target"]["met"] is None
    assert "largest length both ran" in report["target"]["summary"]


def test_a_point_that_does_not_fit_is_skipped_with_the_reason() -> None:
    s = {"plugins": ["eager"], "seq": [2048, 4096], "device": "cpu", "dtype": "float32", "batch": 1, "heads": 8,
         "kv_heads": 8, "head_dim": 16, "reps": 0, "slow_s": 20.0, "mem_cap_gb": 0.05, "timeout_s": 300.0,
         "threads": 1, "options": {}, "not_installed": {}}
    first, second = attention.measure(s, log=False)
    assert first["status"] == "skipped" and "out of memory (cap 0.05 GB)" in first["reason"]
    assert second["status"] == "skipped" and second["reason"].startswith("not tried: skipped at 2048 tokens")


def test_a_plugin_not_installed_yet_is_skipped() -> None:
    s = {"plugins": ["sliding"], "seq": [16], "not_installed": {"sliding": "not installed"}}
    assert attention.measure(s, log=False) == [
        {"plugin": "sliding", "seq": 16, "status": "skipped", "reason": "not installed"}]


def test_a_saved_report_is_replotted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"plugin": p, "seq": t, "status": "ok", "peak_mem_bytes": m * t, "time_s": 0.001 * t}
            for p, m in (("eager", 100), ("linear", 10)) for t in (1024, 32768)]
    saved = {"command": "dsr1 bench attention --plugins eager,linear --seq 1024,32768",
             "settings": {"plugins": ["eager", "linear"], "batch": 1, "heads": 7, "kv_heads": 1, "head_dim": 128,
                          "dtype": "bfloat16"}, "machine": {"gpu": "NVIDIA H200", "cpu": "x"}, "results": rows}
    (tmp_path / "h.json").write_text(json.dumps(saved))
    png = tmp_path / "h.png"
    assert main(["bench", "attention", "--from-json", str(tmp_path / "h.json"), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    assert "linear peak memory is 10.0% of eager at 32768 tokens (target ≤ 27%: met)" in capsys.readouterr().out

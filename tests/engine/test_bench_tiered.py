"""``python -m dsr1.benchmarks.tiered``: bad input is one line, a tiny CPU run gives a complete report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1.benchmarks import tiered
from dsr1.errors import Dsr1Error

#: planned with these instead of measuring (GB/s): the test does not time the machine's memory and disk.
BANDWIDTH = ["--bandwidth", "device_read=10", "--bandwidth", "host_to_device=10", "--bandwidth", "host_read=10",
             "--bandwidth", "disk_read=1", "--bandwidth", "cpu_matmul=10"]

BAD = {
    "budget not a number": (["--budgets", "0.5,half"], "comma-separated fractions"),
    "budget not positive": (["--budgets", "0.5,0"], "fractions > 0"),
    "disk row of one figure": (["--disk-row", "0.25"], "GPU,CPU fractions"),
    "bandwidth without a figure": (["--bandwidth", "disk_read"], "NAME=GB/S"),
    "one new token": (["--new-tokens", "1"], "--new-tokens ≥ 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case: str, tmp_path: Path) -> None:
    extra, expected = BAD[case]
    with pytest.raises(Dsr1Error) as err:
        tiered.main(["--device", "cpu", "--shape", "dsr1-tiny", "--work-dir", str(tmp_path), *extra])
    assert expected in str(err.value) and "\n" not in str(err.value)


def _decoded(entry: dict) -> bool:
    """A decode figure, or the one failure a loaded machine may cause (no measurable decode time)."""
    if "decode_tok_s" in entry:
        assert entry["decode_tok_s"] > 0
        return True
    assert "no measurable time" in entry["error"], entry
    return False


def test_tiny_cpu_run_writes_a_complete_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tiered, "WARMUP_S", 0.0)  # one warm-up generate per row: the test checks the report
    out = tmp_path / "t.json"
    argv = ["--device", "cpu", "--shape", "dsr1-tiny", "--work-dir", str(tmp_path / "work"),
            "--budgets", "1.0,0.5,0.01", "--batch-size", "1,2", "--prompt-len", "4", "--new-tokens", "6",
            "--reps", "2", "--compare", "accelerate", "--output", str(out), *BANDWIDTH]
    assert tiered.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m dsr1.benchmarks.tiered --device cpu --shape dsr1-tiny")
    assert report["hardware"] and report["versions"]["torch"] and "transformers" in report["versions"]
    assert "accelerate" in report["versions"] and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["weight_bytes"] == 2 * report["checkpoint"]["bytes"]  # bf16 on disk, fp32 in memory
    assert (tmp_path / "work" / "dsr1-tiny-bf16" / "model.safetensors").is_file()
    assert "disk_row_skipped" in report  # the CPU's budget rows stream from disk already
    assert sorted(report["single"]) == ["1", "2"]
    assert [(e["row"], e["batch_size"]) for e in report["results"]] == [
        (r, b) for r in ("budget 1", "budget 0.5", "budget 0.01") for b in (1, 2)]
    for e in report["results"]:
        t = e["tiered"]
        assert t["pool_options"]["cpu_memory_gb"] > 0 and t["pool_options"]["disk_dir"].startswith(str(tmp_path))
        if e["budget_fraction"] == 0.01:  # a budget below two units' buffers: the pool's one-line refusal
            assert t["error"].startswith("Dsr1Error: pool tiered: cpu_memory_gb"), t
            continue
        plan = t["plan"]
        assert plan["compute"] == "cpu" and plan["bandwidth_gbps"]["disk_read"] == 1.0
        if e["budget_fraction"] == 1.0:  # everything fits: nothing streams
            assert plan["tiers"]["disk"]["bytes"] == 0 and plan["streaming_buffers"]["count"] == 0
        else:
            assert plan["tiers"]["disk"]["bytes"] > 0 and plan["host_bytes"] <= t["budget_bytes"]
        assert t["greedy_identical_to_single"] is True
        assert t["budget_bytes"] == int(e["budget_fraction"] * report["weight_bytes"])
        assert t["peak_bytes"] > 0 and t["peak_method"] and "peak_above_load_baseline_bytes" in t
        if _decoded(t):
            assert t["floor_tok_s"] == pytest.approx(e["batch_size"] / plan["floor_s"], rel=1e-3)
            assert t["fraction_of_floor"] > 0
            if _decoded(report["single"][str(e["batch_size"])]):
                assert e["ratio_vs_single"] > 0
                assert ("within_2pct_of_single" in e) == (e["budget_fraction"] == 1.0)
        a = e["accelerate"]
        if report.get("accelerate_skipped") or e["budget_fraction"] >= 1.0:
            assert a["skipped"]
        else:
            assert a["max_memory"] == {"cpu": t["budget_bytes"]} and a["device_map"]
            if _decoded(a) and "decode_tok_s" in t:
                assert e["ratio_vs_accelerate"] > 0
    assert "budget 0.5" in printed and "of floor" in printed


def test_without_accelerate_the_comparison_is_skipped_with_the_reason(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tiered, "accelerate_problem", lambda: "accelerate comparison skipped: No module named 'x'")
    out = tmp_path / "t.json"
    argv = ["--device", "cpu", "--shape", "dsr1-tiny", "--work-dir", str(tmp_path / "work"), "--budgets", "0.5",
            "--batch-size", "1", "--prompt-len", "4", "--new-tokens", "4", "--reps", "1", "--compare", "accelerate",
            "--output", str(out), *BANDWIDTH]
    assert tiered.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["accelerate_skipped"].startswith("accelerate comparison skipped")
    (row,) = report["results"]
    assert row["accelerate"] == {"skipped": report["accelerate_skipped"]} and "ratio_vs_accelerate" not in row
    assert row["tiered"]["plan"]["tiers"]["disk"]["bytes"] > 0

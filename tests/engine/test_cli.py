"""``dsr1 generate`` and ``dsr1 bench`` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1.cli import main


def test_generate_streams_and_json(ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ckpts["llama"])
    assert main(["generate", "--model", path, "--max-new-tokens", "8", "The Python interpreter"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("The Python interpreter") and len(streamed) > len("The Python interpreter\n")
    assert main(["generate", "--model", path, "--max-new-tokens", "8", "--json", "The Python interpreter"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "The Python interpreter" + report["text"] + "\n" == streamed
    assert report["prompt_tokens"] > 0 and report["new_tokens"] <= 8
    assert report["timings"]["decode_s"] > 0 and report["pipeline"]["kvcache"]["name"] == "contiguous"
    assert report["pipeline"]["attention"]["name"] == "sdpa"
    args = ["generate", "--model", path, "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20",
            "--top-p", "0.9", "--seed", "3", "--json", "A function"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)["text"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["text"] == first


def test_generate_with_config_file(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("attention: engine-test-nogqa\nmonitor: timing\n")
    argv = ["generate", "--model", str(ckpts["qwen2"]), "--config", str(cfg), "--max-new-tokens", "4", "--json", "Hi"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["attention"]["name"] == "engine-test-nogqa"
    assert report["pipeline"]["attention"]["distribution"] == "dsr1-engine-testplugins"


def test_seed_hardware_yaml_runs_end_to_end_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/hardware-cpu.yaml (the seed's hardware section, type cpu) drives generate on dsr1-tiny."""
    cfg = Path(__file__).resolve().parents[2] / "examples" / "hardware-cpu.yaml"
    argv = ["generate", "--model", "dsr1-tiny", "--config", str(cfg), "--max-new-tokens", "6", "--seed", "0", "--json",
            "The Python interpreter"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    pipeline = report["pipeline"]
    assert pipeline["device"]["name"] == "cpu" and pipeline["quant"]["name"] == "fp32"
    assert pipeline["graph"]["name"] == "eager" and report["new_tokens"] == 6 and report["text"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "{llama}", "   "], "empty prompt"),
        (["generate", "--model", "/no/such/dir", "hi"], "model path '/no/such/dir' does not exist"),
        (["generate", "--model", "{llama}", "--max-new-tokens", "0", "hi"], "max_new_tokens must be a positive"),
        (["generate", "--model", "{llama}", "--temperature", "-1", "hi"], "temperature must be >= 0"),
        (["generate", "--model", "{llama}", "--top-p", "0", "hi"], r"top_p must be in (0, 1]"),
    ],
)
def test_generate_errors_are_one_line(ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                      argv: list[str], message: str) -> None:
    argv = [a.replace("{llama}", str(ckpts["llama"])) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsr1: error: ") and message in err and err.count("\n") == 1


def test_bench_compares_with_transformers(ckpts: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(ckpts["qwen2"]), "--compare", "hf", "--batch-size", "2", "--prompt-len", "4",
            "--new-tokens", "4", "--reps", "1", "--threads", "1", "--json", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    assert [r["batch_size"] for r in report["results"]] == [2]
    row = report["results"][0]
    for engine in ("dsr1", "hf"):
        assert row[engine]["decode_tok_s"] > 0 and row[engine]["peak_mem_mb"] >= 0
    assert set(row["ratio_vs_hf"]) == {"prefill_tok_s", "decode_tok_s", "e2e_tok_s", "peak_mem"}
    assert report["command"].startswith("dsr1 bench --model") and report["versions"]["torch"]
    assert report["floor"]["weight_bytes"] > report["floor"]["streamed_bytes_per_token"] > 0 and report["machine"]["cpu"]


def test_bench_rejects_shape_without_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shape", "tiny-125m"]) == 2
    assert "--shape needs --random-weights" in capsys.readouterr().err


def test_bench_rounds_alternate_engines_and_report_medians(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dsr1.benchmarks import throughput as bench

    order: list[str] = []
    decode = {"dsr1": iter([30.0, 10.0, 20.0]), "hf": iter([5.0, 15.0, 10.0])}
    peaks = {"dsr1": iter([100.0, 300.0, 200.0]), "hf": iter([50.0, 60.0, 40.0])}

    def fake_spawn(spec: dict) -> dict:
        engine = spec["engine"]
        order.append(engine)
        rate = next(decode[engine])
        return {"prefill_tok_s": rate * 10, "decode_tok_s": rate, "e2e_tok_s": rate, "prefill_s": 1 / rate,
                "generate_s": 2 / rate, "peak_mem_mb": next(peaks[engine]), "weight_bytes": 8, "streamed_bytes": 4,
                "other_processes_cpu_pct": 0.0}

    monkeypatch.setattr(bench, "spawn", fake_spawn)
    monkeypatch.setattr(bench, "bandwidth_gbs", lambda device: 1.0)
    argv = ["bench", "--shape", "tiny-125m", "--random-weights", "--compare", "hf", "--batch-size", "8",
            "--rounds", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert order == ["dsr1", "hf", "hf", "dsr1", "dsr1", "hf"]
    row = report["results"][0]
    assert row["dsr1"]["decode_tok_s"] == 20.0 and row["hf"]["decode_tok_s"] == 10.0  # medians
    assert row["dsr1"]["peak_mem_mb"] == 300.0 and row["hf"]["peak_mem_mb"] == 60.0  # highest
    assert [r["decode_tok_s"] for r in row["dsr1"]["rounds"]] == [30.0, 10.0, 20.0]
    assert row["ratio_vs_hf"]["decode_tok_s"] == 2.0 and row["ratio_vs_hf"]["peak_mem"] == 5.0
    assert "--rounds 3" in report["command"]
    assert report["floor"]["beaten_by"] == []  # 20 tok/s of 4-byte steps is far below 1 GB/s


def test_a_decode_faster_than_the_floor_is_flagged(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from dsr1.benchmarks import throughput as bench
    from dsr1.benchmarks.common import above_floor

    assert above_floor(100.0, 1, 400_000_000, 16.5) == 40.0  # 100 tok/s of 400 MB steps read 40 GB/s
    assert above_floor(100.0, 4, 400_000_000, 16.5) == 0.0  # four rows share each step's read
    monkeypatch.setattr(bench, "spawn", lambda spec: {
        "prefill_tok_s": 10.0, "decode_tok_s": 100.0, "e2e_tok_s": 50.0, "prefill_s": 0.1, "generate_s": 0.2,
        "peak_mem_mb": 1.0, "weight_bytes": 400_000_000, "streamed_bytes": 400_000_000,
        "other_processes_cpu_pct": 0.0})
    monkeypatch.setattr(bench, "bandwidth_gbs", lambda device: 16.5)
    assert main(["bench", "--shape", "tiny-125m", "--random-weights", "--batch-size", "1", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["floor"]["beaten_by"] == ["dsr1 at batch 1 (40.0 GB/s)"]
    assert "the floor is not a bound on this machine" in captured.err


def test_the_bandwidth_probe_reads_every_way_decode_does() -> None:
    from dsr1.benchmarks.common import bandwidth_gbs, bandwidth_probe

    from dsr1_sdk.kernels import cpu as cpu_kernels

    probe = bandwidth_probe("cpu")
    # the plain streaming read joins torch's reads wherever the SDK's CPU kernels build
    stream = {"stream"} if cpu_kernels.unavailable() is None else set()
    assert set(probe) == {"gemv_nk", "gemv_kn", "sum"} | stream and min(probe.values()) > 0
    assert bandwidth_gbs("cpu") > 0


def test_bench_rejects_zero_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shape", "tiny-125m", "--random-weights", "--rounds", "0"]) == 2
    assert "--rounds ≥ 1" in capsys.readouterr().err


@pytest.mark.parametrize("by_dsr1", [True, False])
def test_bench_keeps_dsr1s_huge_page_default_out_of_the_transformers_worker(
        monkeypatch: pytest.MonkeyPatch, by_dsr1: bool) -> None:
    import subprocess

    import dsr1.cli
    from dsr1.benchmarks import throughput as bench

    seen: dict[str, str | None] = {}

    def fake_run(cmd: list[str], env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen[json.loads(cmd[-1])["engine"]] = env.get("THP_MEM_ALLOC_ENABLE")
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(dsr1.hugepages, "HUGE_PAGES_BY_DSR1", by_dsr1)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # set by the CLI, or by the user
    for engine in ("dsr1", "hf"):
        bench.spawn({"engine": engine, "threads": 1, "batch_size": 1})
    assert seen == {"dsr1": "1", "hf": "0" if by_dsr1 else "1"}  # a user's own setting reaches both


def test_importing_dsr1_leaves_the_environment_alone() -> None:
    """Huge pages are the CLI's choice (dsr1.cli.enable_huge_pages), not a side effect of ``import dsr1``."""
    import subprocess
    import sys

    code = ("import os; os.environ.pop('THP_MEM_ALLOC_ENABLE', None); import dsr1, dsr1.errors, dsr1_sdk; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"

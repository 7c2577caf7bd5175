"""CLI fixes of issue 20: arguments checked before anything is printed, ``generate -`` reads stdin,
``--help`` shows defaults, ``prune`` prints a summary (``--json``), curve.csv ratios agree with its
columns, bench refuses timings that cannot be real, hints never guess a distribution name, and
progress bars stay away from pipes, ``--json``/``--quiet`` and missing rich."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from dsr1 import progress
from dsr1.benchmarks.rates import rates
from dsr1.cli import build_parser, main
from dsr1.errors import Dsr1Error
from dsr1.tasks.prune.report import curve_rows
from dsr1.registry import PUBLISHED, pip_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DSR1_HOME", str(tmp_path_factory.getbasetemp() / "dsr1home"))
    for var in ("DSR1_PLUGINS", "DSR1_ATTENTION", "DSR1_DEVICE", "DSR1_QUANT", "DSR1_GRAPH", "DSR1_PRUNING"):
        monkeypatch.delenv(var, raising=False)


# --- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "100000"], "exceeds the model's context"),  # checked against the loaded model
])
def test_generate_checks_arguments_before_printing_the_prompt(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["generate", "Hi", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not 'Hidsr1: error: ...'
    assert err.startswith("dsr1: error: ") and message in err and err.count("\n") == 1


def test_generate_dash_reads_the_prompt_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("The capital of Fran\u00e7e\n".encode())))
    assert main(["generate", "-", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt"] == "The capital of Fran\u00e7e"  # the one newline echo adds is dropped


def test_generate_dash_refuses_stdin_that_is_not_utf8(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    assert main(["generate", "-"]) == 2
    assert "stdin is not valid UTF-8" in capsys.readouterr().err


def test_streamed_text_is_one_line_after_the_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "Once upon", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon") and out.endswith("\n") and "dsr1:" not in out


# --- help ---------------------------------------------------------------------------------------


def _help(*path: str) -> str:
    parser = build_parser()
    for name in path:  # walk down the sub-commands
        action = next(a for a in parser._actions if getattr(a, "choices", None) and name in a.choices)
        parser = action.choices[name]
    return parser.format_help()


@pytest.mark.parametrize(("path", "shown"), [
    (("generate",), "(default: 64)"),
    (("generate",), "(default: dsr1-tiny)"),
    (("bench",), "--new-tokens NEW_TOKENS default: 64"),
    (("bench", "precision"), "(default: tiny-125m)"),
    (("quantize",), "--quiet"),
])
def test_help_shows_defaults(path: tuple[str, ...], shown: str) -> None:
    text = " ".join(_help(*path).split())  # argparse wraps lines
    assert shown in text


def test_help_does_not_repeat_a_default_the_text_already_gives() -> None:
    text = " ".join(_help("prune").split())
    assert "(default 8) (default: 8)" not in text and "(default 8)" in text


# --- prune --------------------------------------------------------------------------------------


def test_prune_prints_a_summary_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fast = ["--eval-tokens", "256", "--eval-window", "128", "--calibration-samples", "2", "--calibration-len", "32",
            "--no-speed", "--model", "dsr1-tiny", "--target-sparsity", "0.3"]
    assert main(["prune", *fast, "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "dense: sparsity 0.000" in out and "stage-0.30: sparsity 0.3" in out and str(tmp_path / "a") in out
    assert main(["prune", *fast, "--output-dir", str(tmp_path / "b"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["exit_code"] == 0 and [row["point"] for row in got["curve"]] == ["dense", "stage-0.30"]
    with open(got["curve_csv"], newline="") as f:
        assert [row["point"] for row in csv.DictReader(f)] == ["dense", "stage-0.30"]


def test_curve_ratios_agree_with_the_speed_columns() -> None:
    def point(name: str, value: float, pairs: list[float] | None) -> dict[str, Any]:
        speed = {"metric": "decode_tok_s", "value": value, "vs_dense": 9.9}  # a stale ratio is not copied
        if pairs:
            speed["dense_paired"] = pairs
        return {"name": name, "target_sparsity": 0, "realized_sparsity": 0, "params_fraction": 1,
                "prunable_nonzero": 1, "speed": speed}

    rows = curve_rows({"dense": point("dense", 100.0, None),
                       "stages": [point("stage-0.50", 120.0, [90.0, 110.0])]})
    dense, stage = rows
    assert dense["speed_vs_dense"] == 1.0 and dense["speed_vs_dense_paired"] == 1.0
    assert stage["speed_vs_dense"] == round(stage["speed"] / dense["speed"], 3) == 1.2
    assert stage["dense_speed_paired"] == 100.0
    assert stage["speed_vs_dense_paired"] == round(stage["speed"] / stage["dense_speed_paired"], 3)


# --- bench --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t1", "tn", "message"), [
    ([0.1, 0.1], [0.1, 0.1], "no longer than prefill alone"),  # the case that printed 7e9 tok/s
    ([0.2], [0.1], "no longer than prefill alone"),
    ([0.0], [0.5], "not a positive, finite duration"),
    ([0.1], [math.inf], "not a positive, finite duration"),
    ([math.nan], [0.5], "not a positive, finite duration"),
    ([-0.1], [0.5], "not a positive, finite duration"),
])
def test_bench_refuses_timings_that_cannot_be_real(t1: list[float], tn: list[float], message: str) -> None:
    with pytest.raises(Dsr1Error, match=message) as err:
        rates("bench dsr1 batch 8", 8, 64, 64, t1, tn)
    assert "\n" not in str(err.value)


def test_bench_rates_of_good_timings() -> None:
    got = rates("x", 8, 64, 33, [0.5, 0.4, 0.6], [2.5, 2.4, 2.6])
    assert got["prefill_tok_s"] == 8 * 64 / 0.5 and got["decode_tok_s"] == pytest.approx(8 * 32 / 2.0)
    assert all(math.isfinite(v) and v > 0 for v in got.values())


# --- hints --------------------------------------------------------------------------------------


def test_published_table_matches_the_plugin_distributions() -> None:
    found: dict[str, dict[str, str]] = {}
    for pyproject in ROOT.glob("plugins/*/*/pyproject.toml"):
        meta = tomllib.loads(pyproject.read_text())["project"]
        for group, eps in meta.get("entry-points", {}).items():
            family = group.removeprefix("dsr1.")
            for name in eps:
                found.setdefault(family, {})[name] = meta["name"]
    assert found == PUBLISHED


def test_hints_never_guess_a_distribution() -> None:
    assert pip_hint("attention", "sdpa") == "pip install dsr1-attention-sdpa"
    assert pip_hint("quant", "bf16") == "pip install dsr1-quant-float"
    typo = pip_hint("attention", "sdpx")
    assert "pip install" not in typo and "sdpa" in typo
    assert "pip install dsr1-kvcache" not in pip_hint("kvcache", "pagd")


def test_unknown_plugin_error_names_no_guessed_distribution(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSR1_ATTENTION", "sdpx")
    assert main(["generate", "Hi", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "did you mean 'sdpa'" in err and "pip install" not in err


# --- progress -----------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_never_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSR1_PROGRESS", raising=False)
    assert progress.enabled(stream=_Tty())
    assert not progress.enabled(quiet=True, stream=_Tty())  # --json / --quiet
    assert not progress.enabled(stream=io.StringIO())  # a pipe or a file
    monkeypatch.setenv("DSR1_PROGRESS", "0")
    assert not progress.enabled(stream=_Tty())


def test_progress_without_rich_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # import rich.progress raises ImportError
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert not progress.enabled()
    with progress.progress("loading", total=3) as bar:
        assert not bar.shown
        bar.advance()
        progress.advance(5, total=lambda: 10)  # no bar shown: nothing happens
    assert sys.stderr.getvalue() == ""


def test_progress_on_a_terminal_follows_nested_work(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich.progress")
    monkeypatch.delenv("DSR1_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", _Tty())
    with progress.progress("quantizing", total=None) as bar:
        assert bar.shown
        live = progress._LIVE
        progress.advance(5, total=lambda: 20)  # the checkpoint reader: bytes read of the total
        assert (live.tasks[-1].completed, live.tasks[-1].total) == (5, 20)
        with progress.progress("writing", total=2) as inner:  # a nested bar: a task of the same display
            inner.advance()
            assert progress._LIVE is live and live.tasks[-1].completed == 1
    assert progress._LIVE is None

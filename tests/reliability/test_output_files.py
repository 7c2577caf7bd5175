"""Single output files (dsr1.output_files): ``dsr1 bench`` and its forms write ``--output`` reports and ``--plot``
charts only where nothing is or over a previous dsr1 output, atomically; a user's file, a directory or a damaged
``--from-json`` report is one line and exit 2, before any measuring."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsr1.benchmarks.common import write_report
from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.output_files import check_output, is_dsr1_report, write_atomic

NOTES = "my precious notes\n"


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_only_missing_files_and_dsr1_outputs_may_be_written(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new" / "deeper" / "r.json", "--output") == tmp_path / "new" / "deeper" / "r.json"
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"writer": "dsr1", "results": []}))
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"command": "python -m dsr1.benchmarks.decode_modes --quant int8"}))
    for path in (ours, older):
        check_output(path, "--output")
    notes = tmp_path / "notes.json"
    notes.write_text(NOTES)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"command": "my own script"}))
    for path in (notes, other):
        with pytest.raises(Dsr1Error, match="exists and was not written by dsr1; pass another path"):
            check_output(path, "--output")
    with pytest.raises(Dsr1Error, match="is a directory; pass the path of a file"):
        check_output(tmp_path, "--plot")
    (tmp_path / "link.json").symlink_to(ours)
    with pytest.raises(Dsr1Error, match="not a regular file"):
        check_output(tmp_path / "link.json", "--output")


def test_charts_are_recognised_by_their_software_chunk(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    write_atomic(ours, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": "dsr1 bench"}), "--plot")
    fig.savefig(theirs, format="png")
    plt.close(fig)
    check_output(ours, "--plot")
    with pytest.raises(Dsr1Error, match="--plot .* was not written by dsr1"):
        check_output(theirs, "--plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.png", "theirs.png"]  # no temp file left


def test_reports_are_strict_json_marked_as_dsr1s_and_replace_only_their_own(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    text = write_report({"rate": math.inf, "nested": [math.nan, 1.5]}, str(out))
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data == json.loads(text) == {"writer": "dsr1", "rate": "inf", "nested": ["nan", 1.5]}
    assert is_dsr1_report(data)
    write_report({"second": 1}, str(out))  # its own previous output: replaced
    assert json.loads(out.read_text()) == {"writer": "dsr1", "second": 1}
    user = tmp_path / "user.json"
    user.write_text(NOTES)
    with pytest.raises(Dsr1Error, match="was not written by dsr1"):
        write_report({"x": 1}, str(user))
    assert user.read_text() == NOTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "user.json"]


@pytest.mark.parametrize("form", [
    ["--shape", "tiny-125m", "--random-weights", "--batch-size", "1", "--prompt-len", "8", "--new-tokens", "4"],
    ["attention", "--seq", "64", "--plugins", "eager"],
    ["kvcache", "--model", "dsr1-tiny", "--context", "64", "--caches", "contiguous"],
    ["precision"],
    ["serve", "--requests", "2"],
])
def test_bench_forms_refuse_a_users_file_before_measuring(form: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text(NOTES)
    _refused(capsys, ["bench", *form, "--output", str(notes)], "--output")
    assert notes.read_text() == NOTES
    _refused(capsys, ["bench", *form, "--output", str(tmp_path)], "is a directory")


def test_bench_plot_and_serve_trace_refuse_a_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "kv.png"
    chart.write_bytes(b"\x89PNG\r\n\x1a\n my own chart")
    _refused(capsys, ["bench", "kvcache", "--model", "dsr1-tiny", "--context", "64", "--caches", "contiguous",
                      "--plot", str(chart)], "--plot")
    assert chart.read_bytes().endswith(b"my own chart")
    trace = tmp_path / "s.trace.jsonl"
    trace.write_text(NOTES)
    _refused(capsys, ["bench", "serve", "--requests", "2", "--output",
                      str(tmp_path / "s.json")], "its .trace.jsonl")
    assert trace.read_text() == NOTES and not (tmp_path / "s.json").exists()


def test_from_json_refuses_another_commands_or_a_damaged_report(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"results": [{"plugin": "sdpa"}]}))
    _refused(capsys, ["bench", "attention", "--from-json", str(wrong)], "is not a report of dsr1 bench attention")
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"command": "dsr1 bench attention --seq 64", "results": [{"plugin": "sdpa"}]}))
    _refused(capsys, ["bench", "attention", "--from-json", str(damaged)], "the report is damaged")

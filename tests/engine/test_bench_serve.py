"""``dsr1 bench serve`` on dsr1-tiny: one trace replayed through the continuous scheduler, the
static one and transformers' ``generate_batch`` on the same weights; bad comparisons refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1.cli import main


def test_serve_compares_static_and_transformers_on_one_trace(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "serve.json"
    # --num-blocks: every pool (transformers' too) sized alike and small, not from free memory
    argv = ["bench", "serve", "--requests", "5", "--lengths", "uniform:8-24,4-4", "--compare", "static,hf",
            "--num-blocks", "64", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"continuous", "static", "hf"}
    for name in ("continuous", "static", "hf"):
        r = report["results"][name]
        assert r["requests"] == 5 and r["output_tok_s"] > 0
    assert report["results"]["hf"]["output_tokens"] == 5 * 4  # the same work: every request its 4 tokens
    assert report["continuous_vs_hf"] == pytest.approx(
        report["results"]["continuous"]["output_tok_s"] / report["results"]["hf"]["output_tok_s"], rel=1e-2)
    lines = (tmp_path / "serve.trace.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["output_len"] == 4 for line in lines)
    assert report["command"].startswith("dsr1 bench serve")


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return int(e.code or 0)


@pytest.mark.parametrize("extra, needle", [
    (["--compare", "vllm"], "unknown --compare 'vllm'"),
    (["--compare", "hf", "--rate", "5"], "all arrive at once"),
    (["--compare", "hf", "--lengths", "uniform:8-24,4-9"], "one output length"),
])
def test_serve_refuses_comparisons_it_cannot_make(extra: list[str], needle: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["bench", "serve", "--requests", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_serve_refuses_a_trace_key_it_would_ignore_and_a_prefix_longer_than_the_prompts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt_len": 8, "output_len": 4, "foo": 1}\n')
    assert _exit_code(["bench", "serve", "--trace", str(trace)]) == 2
    assert "unknown key 'foo'" in capsys.readouterr().err
    assert _exit_code(["bench", "serve", "--requests", "2", "--lengths", "uniform:8-16,4-8",
                       "--shared-prefix", "100"]) == 2
    err = capsys.readouterr().err
    assert "--shared-prefix 100 is longer than the shortest prompt" in err and "Traceback" not in err


def test_serve_refuses_zero_kv_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    """0 blocks meant "size the pool for me" (a falsy check in the engine); that is leaving the option out."""
    assert _exit_code(["bench", "serve", "--requests", "2", "--num-blocks", "0"]) == 2
    err = capsys.readouterr().err
    assert "num_blocks must be at least 1 (KV blocks in the pool), got 0" in err and "Traceback" not in err

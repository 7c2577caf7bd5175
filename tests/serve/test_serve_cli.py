"""``dsr1 serve``'s own refusals: bad options, and a model that fails to load (exit 2, one line)."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytest.importorskip("fastapi")


@pytest.mark.parametrize(("args", "says"), [
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--shape", "tiny-125m"], "--shape and --random-weights go together"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--api-key", " "], "--api-key is empty"),
    (["--model", "/nonexistent/dsr1-model", "--port", "0"], "does not exist"),
])
def test_refused_with_one_line_and_exit_2(args: list[str], says: str) -> None:
    r = run_cli("serve", *args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("dsr1: error:")]
    assert len(errors) == 1 and says in errors[0]


def test_bench_serve_url_refuses_the_in_process_engines_options() -> None:
    r = run_cli("bench", "serve", "--url", "http://127.0.0.1:9", "--max-num-seqs", "4")
    assert r.returncode == 2 and "--max-num-seqs sets up the in-process engine" in r.stderr

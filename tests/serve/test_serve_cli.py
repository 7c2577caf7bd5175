"""``dsr1 serve``'s own refusals: bad options, a model or config that would fail to load, a port or host
it cannot listen on: exit 2, one line, and nothing said about loading or listening before it."""
from __future__ import annotations

import socket

import pytest

from tests.conftest import run_cli

pytest.importorskip("fastapi")


@pytest.mark.parametrize(("args", "says"), [
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--shape", "tiny-125m"], "--shape and --random-weights go together"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--api-key", " "], "--api-key is empty"),
    (["--model", "/nonexistent/dsr1-model", "--port", "0"], "model path '/nonexistent/dsr1-model' does not exist"),
    (["--config", "/nonexistent/serve.yaml", "--port", "0"], "config file '/nonexistent/serve.yaml' does not exist"),
    (["--shape", "nosuch", "--random-weights", "--port", "0"], "unknown --shape 'nosuch'; valid: "),
    (["--num-blocks", "-1", "--port", "0"], "--num-blocks must be >= 1 (KV blocks in the pool), got -1"),
    (["--num-blocks", "0", "--port", "0"], "--num-blocks must be >= 1 (KV blocks in the pool), got 0"),
    (["--served-model-name", "", "--port", "0"], "--served-model-name must not be empty or blank, got ''"),
    (["--served-model-name", " \t", "--port", "0"], "--served-model-name must not be empty or blank"),
    (["--host", "nosuchhost.invalid", "--port", "0"], "--host 'nosuchhost.invalid' does not resolve"),
])
def test_refused_with_one_line_and_exit_2(args: list[str], says: str) -> None:
    r = run_cli("serve", *args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("dsr1: error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "dsr1 serve:" not in r.stdout + r.stderr  # no "loading"/"listening"


def test_a_taken_port_is_refused_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", str(port))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines() == [f"dsr1: error: 127.0.0.1:{port} is already in use (another server?); "
                                     f"pick another --port, or --port 0 for a free one"]
    assert r.stdout == ""


def test_bench_serve_url_refuses_the_in_process_engines_options() -> None:
    r = run_cli("bench", "serve", "--url", "http://127.0.0.1:9", "--max-num-seqs", "4")
    assert r.returncode == 2 and "--max-num-seqs sets up the in-process engine" in r.stderr

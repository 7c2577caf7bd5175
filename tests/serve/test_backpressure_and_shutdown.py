"""A full waiting queue answers 429; SIGTERM drains (503 for new requests, running ones finish,
the rest are aborted at the deadline) and the process exits 0. One request runs at a time
(``max_num_seqs: 1``) and every step is slowed a little, so which request runs and which waits
does not depend on the machine's speed. The drain test ends the module's server: it runs last."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import ServerProcess, start_server

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dsr1[serve]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "dsr1-tiny"
#: the drain deadline: far above what the short request needs (10 steps), far below the long one's
#: 480 steps of at least STEP_S each.
DRAIN_S = 4.0
STEP_S = 0.02


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = Path(tmp_path_factory.mktemp("serve")) / "one-at-a-time.json"
    config.write_text(json.dumps({"scheduler": {"name": "continuous", "options": {"max_num_seqs": 1}}}))
    yield from start_server("--model", MODEL, "--config", str(config), "--max-queue", "1",
                            "--drain-timeout", str(DRAIN_S), step_delay=STEP_S)


def body(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The Python interpreter", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}


def events(lines: Iterator[str], count: int | None = None) -> list[dict[str, Any] | str]:
    """The next ``count`` SSE events (all that remain when None); ``"[DONE]"`` as a string."""
    out: list[dict[str, Any] | str] = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
        if count is not None and len(out) == count:
            break
    return out


def test_a_full_queue_answers_429_and_serving_goes_on(server: ServerProcess) -> None:
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body(400)) as running:
            lines = running.iter_lines()
            assert len(events(lines, 1)) == 1  # this one runs
            with http.stream("POST", f"{server.url}/v1/completions", json=body(400)) as waiting:
                assert waiting.status_code == 200  # admitted: it waits (one running at a time)
                full = http.post(f"{server.url}/v1/completions", json={**body(4), "stream": False})
                assert full.status_code == 429
                assert full.headers["retry-after"] == "1"
                err = full.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error" and "1" in err["message"]
                client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    deadline = time.monotonic() + 10  # both streams were closed: their requests are aborted
    while server.metrics()["dsr1_num_requests_running"] or server.metrics()["dsr1_num_requests_waiting"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/v1/completions", json={**body(3), "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.metrics()['dsr1_requests_rejected_total{status="429"}'] == 2


def test_sigterm_drains_then_exits_0(server: ServerProcess) -> None:
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body(10)) as short, \
                http.stream("POST", f"{server.url}/v1/completions", json=body(480)) as long:
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            first = events(short_lines, 1)
            assert first and isinstance(first[0], dict)
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code != 503:
                assert time.monotonic() < deadline, "the server did not start draining"
                time.sleep(0.02)
            assert health.json() == {"status": "draining"}
            refused = httpx.post(f"{server.url}/v1/completions", json={**body(2), "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            rest = events(short_lines)
            assert rest[-1] == "[DONE]"
            chunks = [e for e in first + rest if isinstance(e, dict)]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # running requests finish
            assert len(chunks) == 10
            tail = events(long_lines)  # 480 slowed steps outlast the drain deadline: aborted
            assert tail[-1] == "[DONE]"
            assert [e for e in tail if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] == "abort"
    assert server.proc.wait(timeout=30) == 0

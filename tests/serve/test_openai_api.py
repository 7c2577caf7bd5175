"""``dsr1 serve`` through the official ``openai`` client: greedy parity with ``model.generate``,
streams equal to whole replies, the chat template, 64 concurrent clients, disconnects, bad input,
the API key and ``/metrics``. One server for the module (dsr1-tiny, 127.0.0.1, a free port)."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.serve.conftest import ServerProcess, generate_text, start_server

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dsr1[serve]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-0123"
MODEL = "dsr1-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    yield from start_server("--model", MODEL, "--api-key", KEY, step_delay=0.005)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=120, max_retries=0)


def ids_of(reference: Any, text: str) -> list[int]:
    return list(reference.tokenizer.encode(text))


def chat_ids(reference: Any, messages: list[dict[str, str]]) -> list[int]:
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(reference.tokenizer.encode(text, add_special_tokens=False))


def test_health_and_models(server: ServerProcess, client: Any) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # open without a key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_listening_is_said_once_the_model_is_in(server: ServerProcess) -> None:
    said = [line for line in server.lines if line.startswith("dsr1 serve:")]
    assert said[0] == f"dsr1 serve: loading model {MODEL!r}; {server.url}/health says 503 until it is in\n", said
    assert said[1] == f"dsr1 serve: listening on {server.url} (model {MODEL!r})\n", said
    assert server.first_health == 200  # asked right after "listening": no "loading" left to see


def test_greedy_completion_equals_model_generate(client: Any, reference: Any) -> None:
    prompt = "The Python interpreter"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    want = generate_text(reference, ids_of(reference, prompt), 16)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len(ids_of(reference, prompt))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_stream_equals_non_stream(client: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="A list comprehension", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last
    messages = [{"role": "user", "content": "What does import do?"}]
    whole_chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole_chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole_chat.choices[0].finish_reason


def test_stream_ends_with_done(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "stream": True}
    lines = [ln for ln in httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
             .text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] is not None


def test_chat_applies_the_template(client: Any, reference: Any) -> None:
    messages = [{"role": "system", "content": "You answer about Python."},
                {"role": "user", "content": "What is a tuple?"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    ids = chat_ids(reference, messages)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == generate_text(reference, ids, 16)
    plain = client.completions.create(model=MODEL, prompt="What is a tuple?", max_tokens=16, temperature=0)
    assert plain.usage.prompt_tokens != got.usage.prompt_tokens  # the template, not the bare text


def test_sampling_fields_act(client: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Modules group", max_tokens=12, temperature=0.9, top_p=0.95)
    a = client.completions.create(**kw, seed=5)
    b = client.completions.create(**kw, seed=5)
    assert a.choices[0].text == b.choices[0].text  # a seed makes sampling repeatable
    greedy = client.completions.create(model=MODEL, prompt="The Python interpreter", max_tokens=20, temperature=0)
    word = greedy.choices[0].text.split()[1]
    stopped = client.completions.create(model=MODEL, prompt="The Python interpreter", max_tokens=20, temperature=0,
                                        stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    lp = client.completions.create(model=MODEL, prompt="import os", max_tokens=5, temperature=0, logprobs=2)
    n = lp.usage.completion_tokens
    assert len(lp.choices[0].logprobs.tokens) == len(lp.choices[0].logprobs.token_logprobs) == n
    assert all(len(top) <= 2 for top in lp.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 for c in content)


def test_64_concurrent_clients_get_what_they_get_alone(server: ServerProcess, client: Any) -> None:
    """Alone = the same request sent when nothing else runs (greedy parity of a lone request with
    ``model.generate`` is the test above)."""
    words = ["The", "A", "import", "def", "class", "for", "while", "return"]
    prompts = [f"{words[i % 8]} {words[(i * 3) % 8]} {i}" for i in range(64)]
    lengths = [2 + i % 4 for i in range(64)]
    kw: dict[str, Any] = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=120, max_retries=0)

    async def one(prompt: str, n: int) -> str:
        r = await aclient.completions.create(prompt=prompt, max_tokens=n, **kw)
        assert r.usage.completion_tokens == n
        return str(r.choices[0].text)

    async def all_at_once() -> list[str]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths))), 150)
        finally:
            await aclient.close()

    together = asyncio.run(all_at_once())
    alone = [client.completions.create(prompt=p, max_tokens=n, **kw).choices[0].text for p, n in zip(prompts, lengths)]
    assert together == alone
    assert len(set(alone)) > 8  # different prompts, different answers: a mix-up between rows would show
    stats = server.metrics()
    assert stats["dsr1_num_requests_running"] == 0 and stats["dsr1_kv_blocks_used"] == 0


def _wait_idle(server: ServerProcess, within_s: float) -> dict[str, float]:
    """Poll /metrics until nothing runs, for at most ``within_s``; the last figures."""
    deadline = time.monotonic() + within_s
    while True:
        m = server.metrics()
        if (m["dsr1_num_requests_running"] == 0 and m["dsr1_num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_client_dropping_mid_stream_frees_its_request(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "The Python interpreter", "max_tokens": 400, "ignore_eos": True, "stream": True}
    before = server.metrics().get('dsr1_requests_finished_total{finish_reason="abort"}', 0)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a discarded iterator closes the connection itself
            events = [line for line in itertools.islice(lines, 6) if line.startswith("data: ")]
            assert len(events) == 3
            assert server.metrics()["dsr1_num_requests_running"] == 1  # still generating when we leave
    m = _wait_idle(server, 1.0)
    assert m["dsr1_num_requests_running"] == 0 and m["dsr1_kv_blocks_used"] == 0
    deadline = time.monotonic() + 5
    while server.metrics().get('dsr1_requests_finished_total{finish_reason="abort"}', 0) == before:
        assert time.monotonic() < deadline, "the dropped stream was not recorded as aborted"
        time.sleep(0.05)


def test_client_dropping_a_whole_reply_frees_its_request(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "The Python interpreter", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=1.0))
    m = _wait_idle(server, 1.0)
    assert m["dsr1_num_requests_running"] == 0 and m["dsr1_kv_blocks_used"] == 0


LONG = " ".join(["word"] * 600)
#: name: (path, body (a dict, or raw bytes), status, error param or None, a word the message holds)
CASES: dict[str, tuple[str, Any, int, str | None, str]] = {
    "malformed json": ("/v1/completions", b'{"model": ', 400, None, "JSON"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, None, "object"),
    "missing model": ("/v1/completions", {"prompt": "x"}, 400, "model", "missing"),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "dsr1-tiny"),
    "unsupported field": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                   "tools": []}, 400, "tools", "tools"),
    "n > 1": ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n", "n=2"),
    "negative temperature": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400,
                             "temperature", "temperature"),
    "temperature not a number": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400,
                                 "temperature", "temperature"),
    "max_tokens 0": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    "top_p while greedy": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 0, "top_p": 0.5}, 400,
                           "top_p", "greedy"),
    "logit_bias": ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias",
                   "logit_bias"),
    "echo": ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", "echo"),
    "presence_penalty out of range": ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400,
                                      "presence_penalty", "presence_penalty"),
    "prompt longer than the context": ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt", "512"),
    "prompt + max_tokens past the context": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600},
                                             400, "max_tokens", "512"),
    "token id outside the vocabulary": ("/v1/completions", {"model": MODEL, "prompt": [5, 999999]}, 400, None,
                                        "vocabulary"),
    "several prompts": ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    "image content": ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None, "text"),
    "no messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
    "unknown role": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
                     "messages.0.role", "role"),
    "unknown route": ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, None, "Not Found"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_its_status_and_the_openai_error_shape(server: ServerProcess, name: str) -> None:
    path, body, status, param, word = CASES[name]
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}{path}", headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert word in err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if name == "prompt longer than the context":
        assert "601" in err["message"]  # both numbers: the prompt's tokens (bos + 600 words) and the context


def test_server_keeps_serving_after_bad_input(client: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_api_key(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapers need no key


def test_metrics_count_what_was_served(server: ServerProcess, client: Any) -> None:
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["dsr1_generation_tokens_total"] - before.get("dsr1_generation_tokens_total", 0) == 6
    assert after["dsr1_prompt_tokens_total"] - before.get("dsr1_prompt_tokens_total", 0) == r.usage.prompt_tokens
    assert after["dsr1_time_to_first_token_seconds_count"] == before["dsr1_time_to_first_token_seconds_count"] + 1
    assert after["dsr1_time_per_output_token_seconds_count"] >= 1
    assert after["dsr1_kv_blocks_total"] > 0 and after["dsr1_kv_blocks_used"] == 0
    assert 0 <= after["dsr1_prefix_cache_hit_rate"] <= 1
    assert after["dsr1_server_draining"] == 0


def test_bench_serve_drives_the_server_over_http(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from dsr1.cli import main

    assert main(["bench", "serve", "--url", str(server.url), "--api-key", KEY, "--requests", "4", "--lengths",
                 "uniform:4-8,2-4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    got = report["results"]["http"]
    assert got["requests"] == 4 and got["output_tok_s"] > 0
    assert got["ttft_p50_s"] is not None and got["ttft_p50_s"] <= got["ttft_p99_s"]
    assert report["command"].startswith(f"dsr1 bench serve --url {server.url}")

"""The app before the model is in, while draining, and after a failed load: ``/health`` and the
``/v1`` routes answer 503 in the OpenAI error shape, auth still comes first. In process, no model."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dsr1[serve]')")
httpx = pytest.importorskip("httpx")

from dsr1.serve.app import create_app  # noqa: E402 - after the skip: needs the serve extra
from dsr1.serve.state import ServeSettings, ServeState  # noqa: E402

BODY = {"model": "m", "prompt": "x"}


def call(state: ServeState, method: str, path: str, **kw: Any) -> Any:
    async def go() -> Any:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_loading() -> None:
    state = ServeState(ServeSettings(model_name="m"))
    r = call(state, "GET", "/health")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    r = call(state, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "loading"
    assert call(state, "GET", "/v1/models").json() == {"object": "list", "data": []}
    assert b"dsr1_server_draining 0.0" in call(state, "GET", "/metrics").content


def test_draining_and_auth_first() -> None:
    state = ServeState(ServeSettings(model_name="m", api_key="k"))
    state.draining = True
    r = call(state, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 401  # no key: told so before anything else
    r = call(state, "POST", "/v1/completions", json=BODY, headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_failed_load_is_an_error_status() -> None:
    state = ServeState(ServeSettings(model_name="m"))
    state.load_error = RuntimeError("out of memory")
    r = call(state, "GET", "/health")
    assert (r.status_code, r.json()) == (503, {"status": "error"})
    r = call(state, "POST", "/v1/chat/completions", json=BODY)
    assert r.status_code == 503 and "out of memory" in r.json()["error"]["message"]

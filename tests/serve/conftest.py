"""A ``dsr1 serve`` subprocess per test module, on a free port of 127.0.0.1, and the reference model.

The server is started with ``--port 0`` and prints the port it bound, so no two test runs race
for a port. Every wait is bounded: a server that does not come up fails the module with its output.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


REPO = Path(__file__).resolve().parents[2]
#: ``dsr1 <args>`` with every engine step slowed by ``argv[1]`` seconds: a request of a few hundred
#: tokens is then surely still running when a test disconnects, drains or fills the queue, however
#: fast the machine is (dsr1-tiny decodes in about a millisecond a token on an idle CPU).
SLOW_CLI = """
import sys, time
from dsr1.engine.engine import Engine
delay = float(sys.argv[1])
step = Engine.step
def slow_step(self):
    time.sleep(delay)
    return step(self)
Engine.step = slow_step
from dsr1.cli import main
sys.exit(main(sys.argv[2:]))
"""
#: how long a server may take to load dsr1-tiny and answer /health on a loaded 2-core machine.
START_TIMEOUT_S = 120.0


class ServerProcess:
    """A running ``dsr1 serve``: its base URL, its process and everything it printed."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, step_delay: float = 0.0) -> None:
        import httpx

        cli = [sys.executable, "-c", SLOW_CLI, str(step_delay)] if step_delay else [sys.executable, "-m", "dsr1.cli"]
        cmd = [*cli, "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        #: ``/health``'s status code when first asked after "listening" (None: no answer)
        self.first_health: int | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._found.wait(START_TIMEOUT_S) or self.url is None:
            self.stop()
            raise RuntimeError(f"dsr1 serve did not start: {self.output()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        asked = False
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if not asked:
                self.first_health, asked = status, True
            if status == 200:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dsr1 serve did not become healthy: {self.output()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.url is None and "listening on http://" in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
                self._found.set()
        self._found.set()

    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{name{labels}: value}`` (comments left out)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(*args: str, step_delay: float = 0.0) -> Iterator[ServerProcess]:
    env = {k: v for k, v in os.environ.items() if k != "DSR1_API_KEY"}
    # one intra-op thread: the server shares 2 cores with the tests' own model, and torch's spinning
    # worker threads slow both down many times over when they outnumber the cores
    env["OMP_NUM_THREADS"] = "1"
    server = ServerProcess(*args, env=env, step_delay=step_delay)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reference() -> Any:
    """dsr1-tiny in this process: what ``model.generate`` says a request should produce."""
    from dsr1.auto import AutoModel

    return AutoModel.from_pretrained("dsr1-tiny")


def generate_text(model: Any, ids: list[int], max_new_tokens: int, **kwargs: Any) -> str:
    """``model.generate``'s continuation of ``ids``, as text (stops at eos, like the server)."""
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, **kwargs)
    new = out[0, len(ids):].tolist()
    eos = model.generation_defaults.get("eos_token_id")
    eos_ids = set([eos] if isinstance(eos, int) else eos or [])
    if not kwargs.get("ignore_eos"):
        cut = next((i for i, t in enumerate(new) if t in eos_ids), len(new))
        new = new[:cut]
    return str(model.tokenizer.decode(new, skip_special_tokens=True))

"""uvicorn around the app, with dsr1's shutdown: SIGTERM drains instead of cutting requests off.

uvicorn's own SIGTERM handling closes the listening socket at once (new clients get a refused
connection, not an answer) and re-raises the signal after serving (the process then dies of it,
not with exit 0). Here the first SIGTERM or Ctrl-C only marks the server draining: the socket
stays open and answers 503, running requests finish up to ``--drain-timeout``, the rest are
aborted (their streams end with ``finish_reason: abort``), and then uvicorn shuts down and the
command exits 0. A second signal stops waiting.

The socket is bound here (:func:`bind`) before the model is looked at: a taken port or a host that
does not resolve is one line and exit 2, not uvicorn's log line and exit 3 after the model loaded.
The command prints ``loading`` once the socket answers (``/health`` 503) and ``listening`` once the
model is in (``/health`` 200).
"""
from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from dsr1.engine.async_engine import AsyncEngine
from dsr1.errors import Dsr1Error, quote
from dsr1.serve.app import create_app
from dsr1.serve.state import ServeState

#: the GIL switch interval while serving. The engine thread releases the GIL in every torch call
#: and the event loop, busy writing hundreds of streams, then keeps it for up to Python's default
#: 5 ms before the engine gets it back; a shorter slice gives the engine its steps back
#: (bench/results/serve/README.md has the figures).
SWITCH_INTERVAL_S = 0.0005


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains ``state`` before exiting.

    ``on_started(host, port)`` hears that the socket answers (the model may still be loading),
    ``on_ready(host, port)`` that the model is in as well; each is called once, on the event loop."""

    def __init__(self, config: uvicorn.Config, state: ServeState,
                 on_started: Callable[[str, int], None] | None = None,
                 on_ready: Callable[[str, int], None] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.on_started = on_started
        self.on_ready = on_ready
        self.ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    def _address(self) -> tuple[str, int]:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.on_started is not None and self.servers:
            self.on_started(*self._address())

    async def on_tick(self, counter: int) -> bool:  # uvicorn's main loop, every 0.1 s
        engine = self.state.engine
        if self.state.settings.exit_on_engine_error and engine is not None and engine.error is not None:
            self.should_exit = True
        if not self.ready and engine is not None and self.started and self.servers:  # the load thread is done
            self.ready = True
            if self.on_ready is not None:
                self.on_ready(*self._address())
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # uvicorn's signal hook
        # Not uvicorn's: it would re-raise the signal after serving, and the process would die of it.
        if self.state.draining or self._loop is None:  # a second signal, or one before the socket is up
            if self.state.engine is not None:
                self.state.engine.abort_all()
            self.should_exit = True
            if self.state.draining:
                self.force_exit = True
            return
        self.state.draining = True  # from here /health and new requests answer 503
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain() -> None:
            await self.state.drain()
            self.should_exit = True

        self._drain = asyncio.ensure_future(drain())

    def stop(self) -> None:
        """Exit without draining (the model failed to load)."""
        self.should_exit = True


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to ``host:port`` (each address ``host`` names, as uvicorn would take them), not yet
    listening: a taken port, a host that does not resolve or is not this machine's is a
    :class:`Dsr1Error` here, before anything loads. ``port`` 0 takes one free port for all of them."""
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                   socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else "not a valid host name"
        raise Dsr1Error(f"--host {quote(host)} does not resolve ({reason}); give a name or address of this machine, "
                        f"e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn and asyncio set
            if family == socket.AF_INET6:  # as asyncio: the AF_INET address, if any, gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:  # --port 0: the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as err:
                raise Dsr1Error(_bind_error(host, address[1], err)) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_error(host: str, port: int, err: OSError) -> str:
    where = f"{_url_host(host)}:{port}"
    if err.errno == errno.EADDRINUSE:
        return f"{where} is already in use (another server?); pick another --port, or --port 0 for a free one"
    if err.errno == errno.EACCES:
        return (f"cannot listen on {where}: permission denied (ports below 1024 need privileges); pick "
                f"--port 1024 or above, or --port 0 for a free one")
    if err.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {host!r} is not an address of this machine; give --host 127.0.0.1 "
                f"(this machine only) or 0.0.0.0 (every interface)")
    return f"cannot listen on {where}: {err.strerror or err}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(state: ServeState, make_engine: Callable[[], AsyncEngine], sockets: list[socket.socket],
          log_level: str = "warning") -> None:
    """Serve on ``sockets`` (from :func:`bind`), load the engine on a thread meanwhile (``/health`` 503
    until it is in), and serve until drained (SIGTERM/Ctrl-C) or the load fails (``state.load_error``
    then says why)."""
    app = create_app(state)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5, lifespan="off")
    model = state.settings.model_name

    def started(h: str, p: int) -> None:
        print(f"dsr1 serve: loading model {model!r}; http://{_url_host(h)}:{p}/health says 503 until it is in",
              flush=True)

    def ready(h: str, p: int) -> None:
        print(f"dsr1 serve: listening on http://{_url_host(h)}:{p} (model {model!r})", flush=True)

    server = DrainingServer(config, state, started, ready)
    state.load_in_background(make_engine, on_error=lambda err: server.stop())
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        server.run(sockets=sockets)
    finally:
        sys.setswitchinterval(previous)
        for sock in sockets:
            sock.close()
    if state.engine is not None:
        state.engine.shutdown()
    if server.started and state.load_error is None:
        print("dsr1 serve: stopped", file=sys.stderr, flush=True)


__all__ = ["DrainingServer", "bind", "serve"]

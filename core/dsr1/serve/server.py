"""uvicorn around the app, with dsr1's shutdown: SIGTERM drains instead of cutting requests off.

uvicorn's own SIGTERM handling closes the listening socket at once (new clients get a refused
connection, not an answer) and re-raises the signal after serving (the process then dies of it,
not with exit 0). Here the first SIGTERM or Ctrl-C only marks the server draining: the socket
stays open and answers 503, running requests finish up to ``--drain-timeout``, the rest are
aborted (their streams end with ``finish_reason: abort``), and then uvicorn shuts down and the
command exits 0. A second signal stops waiting.
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from dsr1.engine.async_engine import AsyncEngine
from dsr1.serve.app import create_app
from dsr1.serve.state import ServeState


#: the GIL switch interval while serving. The engine thread releases the GIL in every torch call
#: and the event loop, busy writing hundreds of streams, then keeps it for up to Python's default
#: 5 ms before the engine gets it back; a shorter slice gives the engine its steps back
#: (bench/results/serve/README.md has the figures).
SWITCH_INTERVAL_S = 0.0005


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains ``state`` before exiting."""

    def __init__(self, config: uvicorn.Config, state: ServeState,
                 on_listening: Callable[[str, int], None] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.on_listening = on_listening
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.on_listening is not None and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_listening(str(host), int(port))

    async def on_tick(self, counter: int) -> bool:  # uvicorn's main loop, every 0.1 s
        engine = self.state.engine
        if self.state.settings.exit_on_engine_error and engine is not None and engine.error is not None:
            self.should_exit = True
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


def serve(state: ServeState, make_engine: Callable[[], AsyncEngine], host: str, port: int,
          log_level: str = "warning") -> None:
    """Open the socket, load the engine on a thread meanwhile (``/health`` 503 until it is in), and
    serve until drained (SIGTERM/Ctrl-C) or the load fails (``state.load_error`` then says why)."""
    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5, lifespan="off")

    def listening(h: str, p: int) -> None:
        print(f"dsr1 serve: listening on http://{h}:{p} (model {state.settings.model_name!r}; /health says 200 "
              f"once it is loaded)", flush=True)

    server = DrainingServer(config, state, listening)
    state.load_in_background(make_engine, on_error=lambda err: server.stop())
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        server.run()
    finally:
        sys.setswitchinterval(previous)
    if state.engine is not None:
        state.engine.shutdown()
    if server.started:
        print("dsr1 serve: stopped", file=sys.stderr, flush=True)


__all__ = ["DrainingServer", "serve"]

"""What one server knows: its settings, the engine once loaded, and whether it drains.

Plain Python, no FastAPI: the app's handlers, the uvicorn glue (SIGTERM → drain) and the tests
all read the same object. The model loads on a background thread after the socket is open, so
``/health`` can say 503 while it loads (what orchestrators poll), and 200 once it is in.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dsr1.engine.async_engine import AsyncEngine


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    #: most requests waiting for admission; a request beyond it gets 429 (None: unbounded).
    max_queue: int | None = None
    #: seconds SIGTERM lets running requests finish before they are aborted.
    drain_timeout_s: float = 30.0
    #: largest request body taken (413 beyond).
    max_body_bytes: int = 16 << 20
    #: ``--reasoning-parser``: chat replies carry the thinking as ``reasoning_content`` (None: off).
    reasoning_parser: str | None = None
    #: exit when the engine loop stops on an error (a launch with several ranks: a rank is gone, and
    #: the server cannot answer again), instead of answering 503 with the error on ``/health``.
    exit_on_engine_error: bool = False


class ServeState:
    """The engine (once loaded), the in-flight count and the drain flag of one server."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.started = time.time()
        self._inflight = 0
        self._idle: asyncio.Event | None = None

    # --- loading -------------------------------------------------------------------------------

    def load_in_background(self, make_engine: Callable[[], AsyncEngine],
                           on_error: Callable[[BaseException], None] | None = None) -> threading.Thread:
        """Build the engine on a thread; ``on_error`` hears a failure (the server then exits)."""
        def load() -> None:
            try:
                self.engine = make_engine()
            except BaseException as err:  # noqa: BLE001 - reported through /health and on_error
                self.load_error = err
                if on_error is not None:
                    on_error(err)

        thread = threading.Thread(target=load, name="dsr1-load", daemon=True)
        thread.start()
        return thread

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def status(self) -> str:
        """``ok``, ``loading``, ``draining`` or ``error``: what ``/health`` says."""
        if self.load_error is not None or (self.engine is not None and not self.engine.alive):
            return "error"
        if self.engine is None:
            return "loading"
        return "draining" if self.draining else "ok"

    def stats(self) -> Mapping[str, Any] | None:
        return None if self.engine is None else self.engine.stats()

    def monitor(self) -> Any:
        return None if self.engine is None else self.engine.engine.monitor

    # --- in-flight requests (what a drain waits for) --------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def enter(self) -> None:
        self._inflight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (on the server's event loop) until no request is in flight; False at the timeout."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self._inflight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return self._inflight == 0
        return True

    async def drain(self) -> None:
        """Refuse new requests (503), let the running ones finish up to the deadline, then abort
        the rest and wait (briefly) for their final chunks to go out."""
        self.draining = True
        if await self.wait_idle(self.settings.drain_timeout_s):
            return
        if self.engine is not None:
            self.engine.abort_all()
        await self.wait_idle(5.0)


__all__ = ["ServeSettings", "ServeState"]

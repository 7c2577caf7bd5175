"""``AsyncEngine``: the engine loop in one background thread, outputs to asyncio queues.

The server and ``dsr1 chat`` talk only to this. Any number of coroutines (or threads, via
:meth:`AsyncEngine.generate_sync`) submit requests; they are batched together by the one loop
instead of racing over the model. Requests and aborts reach the loop through a thread-safe
inbox, so the :class:`~dsr1.engine.engine.Engine` itself is only ever touched by its thread.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from dsr1.engine.engine import Engine, RequestOutput
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams


@dataclass
class _Add:
    prompt: str | Sequence[int]
    params: SamplingParams | None
    request_id: str
    sink: Any  # put(RequestOutput | BaseException)


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs ``engine.step()`` in a daemon thread while any request is live."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._sinks: dict[str, Any] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dsr1-engine", daemon=True)
        self._thread.start()

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"async-{self._ids}"

    # --- the loop thread --------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        stopping = False
        while True:
            items: list[_Add | _Abort | None] = []
            if not engine.has_unfinished():
                if stopping:
                    return
                items.append(self._inbox.get())  # idle: sleep until something arrives
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    stopping = True  # finish what is live, then leave
                else:
                    self._handle(item)
            if not engine.has_unfinished():
                continue
            try:
                outs = engine.step()
            except BaseException as err:  # noqa: BLE001 - every waiting caller gets the error, the loop stops
                self._error = err
                for sink in self._sinks.values():
                    sink(err)
                self._sinks.clear()
                return
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                    if out.finished:
                        del self._sinks[out.request_id]

    def _handle(self, item: _Add | _Abort) -> None:
        if isinstance(item, _Add):
            try:
                self.engine.add_request(item.prompt, item.params, item.request_id)
            except Dsr1Error as err:
                item.sink(err)
                return
            self._sinks[item.request_id] = item.sink
        elif item.request_id in self._sinks:
            out = self.engine.abort(item.request_id)
            self._sinks.pop(item.request_id)(out)

    # --- callers ------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._error is not None:
            raise Dsr1Error(f"the engine loop stopped after an error: {self._error}")
        if not self._thread.is_alive():
            raise Dsr1Error("the engine loop is shut down")

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request; closing the iterator early aborts it."""
        self._check_running()
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        rid = request_id or self._next_id()
        self._inbox.put(_Add(prompt, params, rid, lambda x: loop.call_soon_threadsafe(results.put_nowait, x)))
        finished = False
        try:
            while not finished:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(rid))

    def generate_sync(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> RequestOutput:
        """Blocking form for threads: the request's final output."""
        self._check_running()
        results: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self._inbox.put(_Add(prompt, params, self._next_id(), results.put))
        while True:
            item = results.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                return item

    def shutdown(self) -> None:
        """Stop the loop thread once the live requests are done (no new ones are taken)."""
        self._inbox.put(None)
        self._thread.join()

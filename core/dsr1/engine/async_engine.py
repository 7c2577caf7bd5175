"""``AsyncEngine``: the engine loop in one background thread, outputs to asyncio queues.

The server and ``dsr1 chat`` talk only to this. Any number of coroutines (or threads, via
:meth:`AsyncEngine.generate_sync` / :meth:`AsyncEngine.stream_sync`) submit requests; they are
batched together by the one loop instead of racing over the model. Requests and aborts reach
the loop through a thread-safe inbox, so the :class:`~dsr1.engine.engine.Engine` itself is only
ever touched by its thread; what callers read of its state (:meth:`AsyncEngine.stats`) is a
snapshot the loop publishes between steps.

Admission is decided on the loop thread, where the waiting queue's length is exact: a request
that finds ``max_waiting`` requests already waiting is refused with :class:`QueueFull` (the
server's 429), and a request the engine can never run is refused with its one-line
:class:`~dsr1.errors.Dsr1Error` before any output is produced (the server's 400).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsr1.engine.engine import Engine, RequestOutput
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams


class QueueFull(Dsr1Error):
    """The waiting queue is at its bound; retry later (HTTP 429)."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"the server's waiting queue is full ({waiting} requests waiting, the limit is {limit}); "
                         f"retry later")
        self.waiting, self.limit = waiting, limit


class _Accepted:
    """The first item a sink gets once its request is in the engine."""


ACCEPTED = _Accepted()


class _Sink:
    """Where one request's items go: an asyncio queue on its event loop, or a thread's queue.

    Called alone (acceptance, refusals, aborts) it hands its item over at once; a step's outputs
    are handed over in one batch per event loop (:func:`_deliver`), so a step with hundreds of
    streaming requests wakes each event loop once instead of once per request."""

    __slots__ = ("loop", "put")

    def __init__(self, put: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.put, self.loop = put, loop

    def __call__(self, item: Any) -> None:
        if self.loop is None:
            self.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.put, item)
        except RuntimeError:  # the caller's event loop is closed: nobody reads this (aborted at the next step)
            pass


def _deliver(items: list[tuple[Any, Any]]) -> None:
    """On the event loop: a step's outputs into their requests' queues."""
    for put, item in items:
        put(item)


@dataclass
class _Add:
    prompt: str | Sequence[int]
    params: SamplingParams | None
    request_id: str
    sink: _Sink  # takes _Accepted | RequestOutput | BaseException
    max_waiting: int | None = None


@dataclass
class _Abort:
    request_id: str


class _AbortAll:
    """Abort every live request (a drain's deadline passed)."""


class RequestStream:
    """One accepted request's outputs; ``async for`` them. :meth:`aclose` (or leaving the loop
    early, or the task being cancelled) aborts the request and frees its KV blocks at once.

    Outputs that piled up while the reader was busy come as one (their ``new_ids`` and ``delta``
    joined): a server behind on hundreds of streams then writes one event per stream instead of
    one per token, and catches up instead of slowing the engine thread it shares the GIL with."""

    def __init__(self, engine: AsyncEngine, request_id: str,
                 results: asyncio.Queue[_Accepted | RequestOutput | BaseException], prompt_len: int) -> None:
        self.engine, self.request_id, self._results = engine, request_id, results
        self.prompt_len = prompt_len  # 0 for a text prompt (tokenized by the engine)
        self.finished = False
        self._failed: BaseException | None = None  # an error that arrived behind outputs: raised next

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._failed is not None:
            self.finished = True
            err, self._failed = self._failed, None
            raise err
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._results.get()
        except BaseException:  # cancelled (the client went away): the request must not run on
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput)
        while not item.finished and not self._results.empty():
            later = self._results.get_nowait()
            if isinstance(later, BaseException):
                self._failed = later
                break
            assert isinstance(later, RequestOutput)
            item = later.after(item)
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Runs ``engine.step()`` in a daemon thread while any request is live."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Add | _Abort | _AbortAll | None] = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._snapshot: dict[str, Any] = dict(engine.stats())
        self._thread = threading.Thread(target=self._loop, name="dsr1-engine", daemon=True)
        self._thread.start()

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"async-{self._ids}"

    # --- the loop thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run()
        finally:
            leader = self.engine.lockstep
            if leader is not None and self._error is None:
                leader.stop()  # the other ranks' follower loops end with this one

    def _run(self) -> None:
        engine = self.engine
        leader = engine.lockstep
        stopping = False
        while True:
            items: list[_Add | _Abort | _AbortAll | None] = []
            if not engine.has_unfinished():
                if stopping:
                    return
                if leader is None:
                    items.append(self._inbox.get())  # idle: sleep until something arrives
                else:  # idle under a launch: wake up for the heartbeat the other ranks wait for
                    try:
                        items.append(self._inbox.get(timeout=leader.heartbeat_s))
                    except queue.Empty:
                        try:
                            leader.idle()
                        except BaseException as err:  # noqa: BLE001 - a follower is gone: the loop stops
                            self._fail(err)
                            return
                        continue
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
            self._publish()
            if not engine.has_unfinished():
                continue
            try:
                outs = engine.step()
            except BaseException as err:  # noqa: BLE001 - every waiting caller gets the error, the loop stops
                self._fail(err)
                return
            batches: dict[asyncio.AbstractEventLoop, list[tuple[Any, RequestOutput]]] = {}
            direct: list[tuple[Any, RequestOutput]] = []
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                (direct if sink.loop is None else batches.setdefault(sink.loop, [])).append((sink.put, out))
                if out.finished:
                    del self._sinks[out.request_id]
            self._publish()  # before delivering: whoever gets a final output sees the state after it
            _deliver(direct)
            for loop, items in batches.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that event loop is closed: its requests have no reader left
                    self._orphaned(loop)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        for sink in self._sinks.values():
            sink(err)
        self._sinks.clear()

    def _orphaned(self, loop: asyncio.AbstractEventLoop) -> None:
        for rid in [rid for rid, sink in self._sinks.items() if sink.loop is loop]:
            del self._sinks[rid]
            self.engine.abort(rid)
        self._publish()

    def _publish(self) -> None:
        # one reference swap: readers see a whole dict
        self._snapshot = {**self.engine.stats(), "live": len(self._sinks)}

    def _handle(self, item: _Add | _Abort | _AbortAll) -> None:
        if isinstance(item, _Add):
            waiting = self.engine.scheduler.num_waiting
            if item.max_waiting is not None and waiting >= item.max_waiting:
                item.sink(QueueFull(waiting, item.max_waiting))
                return
            try:
                self.engine.add_request(item.prompt, item.params, item.request_id)
            except Dsr1Error as err:
                item.sink(err)
                return
            self._sinks[item.request_id] = item.sink
            item.sink(ACCEPTED)
        elif isinstance(item, _AbortAll):
            for rid in list(self._sinks):
                self._sinks.pop(rid)(self.engine.abort(rid))
        elif item.request_id in self._sinks:
            out = self.engine.abort(item.request_id)
            self._sinks.pop(item.request_id)(out)

    # --- callers ------------------------------------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        """What stopped the loop, if a step failed."""
        return self._error

    @property
    def alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def stats(self) -> Mapping[str, Any]:
        """The engine's :meth:`~dsr1.engine.engine.Engine.stats` as of the loop's last step, plus
        ``live`` (requests with outputs still to deliver). Safe to call from any thread."""
        return self._snapshot

    def _check_running(self) -> None:
        if self._error is not None:
            raise Dsr1Error(f"the engine loop stopped after an error: {self._error}")
        if not self._thread.is_alive():
            raise Dsr1Error("the engine loop is shut down")

    async def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None, max_waiting: int | None = None) -> RequestStream:
        """Add a request and wait until the loop has taken it: a :class:`RequestStream` of its
        outputs, or the refusal raised here (:class:`QueueFull` when ``max_waiting`` requests
        already wait, the engine's one-line error when it can never run)."""
        self._check_running()
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[_Accepted | RequestOutput | BaseException] = asyncio.Queue()
        rid = request_id or self._next_id()
        self._inbox.put(_Add(prompt, params, rid, _Sink(results.put_nowait, loop), max_waiting))
        stream = RequestStream(self, rid, results, 0 if isinstance(prompt, str) else len(prompt))
        try:
            first = await results.get()
        except BaseException:  # cancelled while the loop takes it: take it back out
            self.abort(rid)
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        return stream

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request; closing the iterator early aborts it."""
        stream = await self.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Abort a live request (an unknown or finished one is left alone); its final output, with
        finish reason ``abort``, goes to its stream."""
        self._inbox.put(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every live request (a drain's deadline)."""
        self._inbox.put(_AbortAll())

    def stream_sync(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Blocking form for threads: the request's outputs as they come. Leaving early (``break``,
        ``close()``, Ctrl-C while waiting) aborts it. Refusals are raised before the first output."""
        self._check_running()
        results: queue.Queue[_Accepted | RequestOutput | BaseException] = queue.Queue()
        rid = self._next_id()
        self._inbox.put(_Add(prompt, params, rid, _Sink(results.put)))
        finished = False
        try:
            while not finished:
                try:
                    item = results.get(timeout=0.1)  # a timed wait lets Ctrl-C through on every platform
                except queue.Empty:
                    continue
                if isinstance(item, _Accepted):
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def generate_sync(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> RequestOutput:
        """Blocking form for threads: the request's final output."""
        last = None
        for last in self.stream_sync(prompt, params):
            pass
        assert last is not None
        return last

    def shutdown(self) -> None:
        """Stop the loop thread once the live requests are done (no new ones are taken)."""
        self._inbox.put(None)
        self._thread.join()


__all__ = ["ACCEPTED", "AsyncEngine", "QueueFull", "RequestStream"]

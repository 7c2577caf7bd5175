"""Builtin scheduler ``static``: FIFO batches, each run to completion (the simple reference).

When nothing runs, it admits up to ``max_batch_size`` waiting requests in arrival order,
reserving KV blocks for each one's whole prompt + ``max_tokens`` up front (so it never
preempts), prefills them whole in one step, then decodes them together until every one has
finished; nothing new starts before the batch is done. Plain data only: no tensors.
"""
from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from dsr1.engine.plan import SchedulerOutput
from dsr1.engine.request import Request, RequestStatus
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Request as LegacyRequest
from dsr1.scheduler.base import QueueScheduler
from dsr1.specs import PluginSpec


class StaticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: most requests run together in one batch.
    max_batch_size: int = Field(default=256, ge=1)


class StaticScheduler(QueueScheduler):
    """FIFO batches; a batch runs to completion before the next one starts."""

    Options = StaticOptions
    options: StaticOptions

    def __init__(self, options: StaticOptions | None = None) -> None:
        super().__init__(options)
        self.queue: deque[LegacyRequest] = deque()  # legacy: removed when generate runs on the engine

    def add(self, request: Request | LegacyRequest) -> None:  # type: ignore[override]  # legacy type too
        if isinstance(request, LegacyRequest):
            self.queue.append(request)  # legacy: removed when generate runs on the engine
            return
        super().add(request)

    def schedule(self) -> SchedulerOutput:
        finished = self.take_finished()
        if not self.running:
            self._admit()
        plan = tuple(self.chunk(r, r.num_tokens - r.num_computed_tokens) for r in self.running)
        return SchedulerOutput(plan, (), finished)

    def _admit(self) -> None:
        blocks = self.blocks
        while self.waiting and len(self.running) < self.options.max_batch_size:
            request = self.waiting[0]
            # Reserve every token the request can ever hold, so the batch never runs out of blocks.
            if not blocks.allocate(request, len(request.prompt_ids) + request.max_tokens):
                break  # FIFO: nothing behind the head may overtake it
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    # --- legacy: removed when generate runs on the engine ---------------------------------

    def next_batch(self) -> list[LegacyRequest]:
        n = min(self.options.max_batch_size, len(self.queue))
        return [self.queue.popleft() for _ in range(n)]

    def has_pending(self) -> bool:
        return bool(self.queue)


@hookimpl
def dsr1_scheduler() -> PluginSpec:
    return PluginSpec(
        name="static",
        family="scheduler",
        impl=StaticScheduler,
        options=StaticOptions,
        description="FIFO batches of up to max_batch_size requests, each run to completion",
    )

"""Builtin scheduler ``static``: first in, first out, in batches of up to ``max_batch_size``.

Plain data only: it sees :class:`dsr1.interfaces.Request` objects, never tensors.
"""
from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Request, Scheduler
from dsr1.specs import PluginSpec


class StaticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: most requests run together in one step.
    max_batch_size: int = Field(default=256, ge=1)


class StaticScheduler(Scheduler):
    """FIFO batches; a batch runs to completion before the next one starts."""

    Options = StaticOptions
    options: StaticOptions

    def __init__(self, options: StaticOptions | None = None) -> None:
        super().__init__(options)
        self.queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self.queue.append(request)

    def next_batch(self) -> list[Request]:
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

"""A request as the scheduler sees it: plain data, no tensors.

The scheduler owns every :class:`Request` from ``add`` until it finishes or is aborted; the
runner only reads it (its token ids and block table) and the engine only reads its outputs.
Because nothing here is a tensor, the state can be broadcast to other ranks, pickled, and
tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class RequestStatus(str, Enum):
    """Where a request is in its life; the finished values are the OpenAI-style finish reasons."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclass(eq=False)  # identity equality: two requests with equal tokens are still two requests
class Request:
    """One generation request, owned by the scheduler.

    ``num_computed_tokens`` counts the leading tokens of :attr:`all_ids` whose keys and values
    are in the KV cache (a prefix-cache hit makes it jump; a preemption resets it to 0, and the
    already generated ``output_ids`` are then recomputed as part of the prompt). A preempted request
    whose KV went to the host swap space instead holds ``host_block_ids`` and ``num_swapped_tokens``
    while it waits, and resumes from there when it is admitted again.
    """

    request_id: str
    prompt_ids: list[int]
    #: new tokens at most (``output_ids`` never grows past it).
    max_tokens: int
    #: ``time.monotonic()`` when the engine added it; queues keep arrival order by position.
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    #: the request's block table: block ``i`` holds the K/V of tokens ``[i * block_size, (i + 1) * block_size)``.
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    #: while swapped out: the host swap blocks holding its first ``num_swapped_tokens`` tokens' K/V.
    host_block_ids: list[int] = field(default_factory=list)
    num_swapped_tokens: int = 0

    @property
    def swapped(self) -> bool:
        """Preempted with its KV in host memory: admitted again, it copies it back instead of recomputing."""
        return bool(self.host_block_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt then output ids (a new list)."""
        return [*self.prompt_ids, *self.output_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def slice_ids(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building ``all_ids`` (a decode step reads one token)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return [*self.prompt_ids[start:], *self.output_ids[: end - n]]

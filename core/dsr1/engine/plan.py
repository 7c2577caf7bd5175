"""What the scheduler hands the runner each step (plain data, frozen).

A :class:`SchedulerOutput` says which requests run, which tokens each feeds at which
positions, and through which KV blocks; the runner turns it into tensors and never decides
anything itself.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    #: tokens to feed this step: a prefill chunk, or the one token sampled last step.
    token_ids: tuple[int, ...]
    #: position of ``token_ids[0]`` (the request's ``num_computed_tokens`` before the step).
    start: int
    #: the whole block table after this step's allocation (covers ``start + len(token_ids)`` tokens).
    block_ids: tuple[int, ...]
    #: this step reaches the end of the request's known tokens: sample one new token.
    sample: bool


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan."""

    scheduled: tuple[ScheduledRequest, ...]
    #: ids moved back to waiting this step; their blocks were freed and they will be recomputed,
    #: except those also in ``swapped``.
    preempted: tuple[str, ...] = ()
    #: ids finished or aborted since the previous plan: the runner drops their per-request state.
    finished: tuple[str, ...] = ()
    #: ``(device block, host block)``: KV copied to the host swap space before this step's forwards.
    swap_out: tuple[tuple[int, int], ...] = ()
    #: ``(host block, device block)``: KV copied back after ``swap_out`` and before the forwards.
    swap_in: tuple[tuple[int, int], ...] = ()
    #: the preempted ids whose KV went to the host (``swap_out``): they resume without recomputing.
    swapped: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens fed this step, over every scheduled request."""
        return sum(len(s.token_ids) for s in self.scheduled)

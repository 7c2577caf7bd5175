"""What each graph pass means for the engine's paged decode step (:mod:`dsr1.engine.paged_graph`).

The paged runner (``serve``, the continuous scheduler) has its own static decode step per batch
bucket: rows gathered from a shared block pool, one copy in, one replay. The graph pass picks how
that step runs, as it picks the batch runner's:

* ``eager``: the static step, not captured;
* ``compile``: the static step through ``torch.compile`` (the pass's arguments), not captured;
* ``cudagraph``: captured per bucket; with ``compile: true`` compiled then captured for buckets
  up to ``compile_max_batch`` (plain capture above), as the batch runner does;
* ``adaptive``: per bucket, the first step measures every plan the device offers on the step's
  real rows and keeps the fastest (:class:`MeasuredPaged`, over the pass's :class:`Planner`).

A config that names no graph pass keeps the runner's own default: captured on CUDA, eager
elsewhere. A chooser is a plain callable, resolved once when the runner is built; a bucket's plan
is read once, on its first step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: the plans of the builtin graph passes, for the batch runner's steps and the paged step alike, in the
#: order a tie is broken (the simpler one wins)
PLANS = ("eager", "compile", "cudagraph", "cudagraph+compile")
#: ``trial(plan)`` → a call that runs the bucket's step with that plan (graph ``adaptive`` times it)
Trial = Callable[[str], Callable[[], Any]]


@dataclass(frozen=True)
class FixedPaged:
    """The plan a fixed graph pass means: ``plan`` for every bucket, except that the compiled step
    stops above ``compile_max_batch`` rows (graph ``cudagraph``'s option: the plain step there)."""

    plan: str
    compile_max_batch: int | None = None

    def __call__(self, size: int, trial: Trial) -> str:
        if self.compile_max_batch is not None and size > self.compile_max_batch:
            return {"cudagraph+compile": "cudagraph", "compile": "eager"}.get(self.plan, self.plan)
        return self.plan


class MeasuredPaged:
    """Graph ``adaptive`` for the paged step: a :class:`~dsr1.graph.adaptive.Planner` over
    :data:`PLANS` (those the device offers), bucket ``(rows, 0)``: the step reads the pool
    through block tables of a fixed width, so its shape depends on the rows alone. Plans are
    cached on disk like the batch runner's, in a file of their own. Unlike the batch runner's
    buckets, a paged bucket's calls are not timed for drift: its steps interleave with prefills
    and admissions, so the time between them is not the step's."""

    def __init__(self, planner: Any) -> None:
        self.planner = planner

    def __call__(self, size: int, trial: Trial) -> str:
        bucket = (size, 0)
        plan = self.planner.plan(bucket)  # a cached plan comes chosen
        if plan.chosen is None:
            self.planner.choose(bucket, trial)
        return str(plan.chosen)

    def exclude(self, size: int, plan: str, err: Exception) -> None:
        """A cached plan failed when it ran: never use it again (one-line warning), measure the rest."""
        self.planner.exclude(plan, (size, 0), err)

    def report(self) -> dict[str, Any]:
        return self.planner.report()  # type: ignore[no-any-return]

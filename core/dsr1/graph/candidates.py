"""The plans graph ``adaptive`` chooses between (:mod:`dsr1.graph.adaptive`): each a
:class:`Candidate` whose ``bind(model, cache, key_valid)`` gives the decode step of one generate
call, made from the step functions of the other builtin passes."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from dsr1.interfaces import Device

#: (batch rows, cache capacity)
Bucket = tuple[int, int]
#: one decode step of a generate call: ``(ids (B, 1), positions (B, 1), slot) -> logits (B, V)``
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@runtime_checkable
class KernelChoices(Protocol):
    """What a quant plugin implements to let ``adaptive`` pick its kernels per bucket too."""

    def kernel_choices(self, device: Device) -> Sequence[str]:
        """The kernels its layers can run on ``device`` (one or none: nothing to choose)."""

    def use_kernel_(self, model: torch.nn.Module, kernel: str) -> None:
        """Make ``model``'s quantized layers run ``kernel`` from now on (cheap: called once per
        generate call, and before each candidate's trial)."""


@dataclass
class Candidate:
    """A plan the pass may pick: ``bind(model, cache, key_valid)`` gives its step for one generate call."""

    name: str
    bind: Callable[[Any, Any, torch.Tensor], Step]
    #: drop what the candidate keeps for a bucket it lost (a captured graph's memory)
    release: Callable[[Bucket], None] = lambda bucket: None
    #: the captured candidates' ``DecodeGraphs`` (None: not captured)
    graphs: Any = None





def unfixed(fn: Callable[..., torch.Tensor]) -> Callable[[Any, Any, torch.Tensor], Step]:
    """A candidate over ``forward_step``'s signature: the batch runner's eager decode call."""

    def bind(model: Any, cache: Any, key_valid: torch.Tensor) -> Step:
        padded = not bool(key_valid.all())  # once per generate call

        def step(ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
            mask = key_valid[:, None, None, : slot + 1] if padded else None  # (B, 1, 1, S) view
            return fn(ids, positions, slot, cache, mask, mask, True)  # (B, V)

        return step

    return bind


def unbound(model: Any, cache: Any, key_valid: torch.Tensor) -> Step:
    raise RuntimeError("a paged plan runs through the paged runner's buckets, not a bound step")


def captured(name: str, graphs: Any) -> Candidate:
    """A candidate over graph ``cudagraph``'s steps (``graphs``: its ``DecodeGraphs``)."""

    def bind(model: Any, cache: Any, key_valid: torch.Tensor) -> Step:
        return graphs.runner(model, cache, key_valid)  # type: ignore[no-any-return]

    def release(bucket: Bucket) -> None:
        graphs.graphs.pop(bucket, None)  # keyed by (batch, capacity), as buckets are

    return Candidate(name, bind, release, graphs)


def with_kernel(candidate: Candidate, quant: KernelChoices, kernel: str) -> Candidate:
    def bind(model: Any, cache: Any, key_valid: torch.Tensor) -> Step:
        quant.use_kernel_(model, kernel)  # once per generate call (and per trial), never per token
        return candidate.bind(model, cache, key_valid)

    return Candidate(f"{candidate.name}[{kernel}]", bind, candidate.release, candidate.graphs)

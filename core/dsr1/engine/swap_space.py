"""The scheduler's half of the KV tier (:mod:`dsr1.engine.swap` has the runner's): host swap
blocks as plain data, no tensors, so the block manager and the schedulers can hold it."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from dsr1.engine.request import Request

#: one plan's copies: ``(device block, host block)`` out, ``(host block, device block)`` in, and the
#: ids of the requests swapped out (see :class:`~dsr1.engine.plan.SchedulerOutput`).
SwapMoves = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], tuple[str, ...]]


class SwapSpace:
    """Host swap blocks: free list, holders, and the copies queued for the next plan (no tensors)."""

    def __init__(self, num_blocks: int, should_swap: Callable[[int], bool]) -> None:
        self.num_blocks = num_blocks
        self.should_swap = should_swap
        self._free: deque[int] = deque(range(num_blocks))
        self._released: list[int] = []  # read by a queued swap-in: free once its plan is taken
        self._holders: dict[str, Request] = {}
        self._out: list[tuple[int, int]] = []
        self._in: list[tuple[int, int]] = []
        self._in_targets: set[int] = set()  # device blocks that queued swap-ins fill
        self._swapped: list[str] = []

    def num_free(self) -> int:
        return len(self._free)

    def pending(self) -> bool:
        """Whether copies are queued that no plan has taken yet."""
        return bool(self._out or self._in)

    def swap_out(self, request: Request, device_blocks: Sequence[int]) -> bool:
        """Queue copies of ``device_blocks`` (the request's computed ones) to host blocks and mark
        the request swapped; False, with no change, when there is no room or the policy says recompute."""
        n = len(device_blocks)
        if n == 0 or n > len(self._free) or any(b in self._in_targets for b in device_blocks):
            return False  # a block a swap-in of this plan still has to fill holds nothing to save yet
        if not self.should_swap(request.num_computed_tokens):
            return False
        host = [self._free.popleft() for _ in range(n)]
        self._out += zip(device_blocks, host)
        request.host_block_ids = host
        request.num_swapped_tokens = request.num_computed_tokens
        self._holders[request.request_id] = request
        self._swapped.append(request.request_id)
        return True

    def swap_in(self, request: Request, first: int, device_blocks: Sequence[int]) -> None:
        """Queue copies of the request's host blocks ``[first:]`` into ``device_blocks`` (its
        table's same indices) and release all its host blocks; the request is no longer swapped."""
        host = request.host_block_ids
        self._in += zip(host[first:], device_blocks)
        self._in_targets.update(device_blocks)
        self._released += host
        self._drop(request)

    def release(self, request: Request) -> None:
        """Free a swapped request's host blocks now (it finished or was aborted while waiting)."""
        self._free.extend(request.host_block_ids)
        self._drop(request)

    def _drop(self, request: Request) -> None:
        request.host_block_ids = []
        request.num_swapped_tokens = 0
        self._holders.pop(request.request_id, None)

    def take(self) -> SwapMoves:
        """The queued copies, for the plan being built; host blocks those copies read become free."""
        moves = (tuple(self._out), tuple(self._in), tuple(self._swapped))
        self._free.extend(self._released)
        self._released, self._out, self._in, self._swapped = [], [], [], []
        self._in_targets.clear()
        return moves

    def check(self) -> None:
        """Raise AssertionError unless every host block is free, just released, or held by exactly one request."""
        held: list[int] = []
        for rid, request in self._holders.items():
            if not request.host_block_ids:
                raise AssertionError(f"request {rid!r} is a swap holder without host blocks")
            held += request.host_block_ids
        everything = [*self._free, *self._released, *held]
        if sorted(everything) != list(range(self.num_blocks)):
            raise AssertionError(f"host swap blocks: free {len(self._free)} + released {len(self._released)} + "
                                 f"held {len(held)} do not partition the {self.num_blocks} blocks")

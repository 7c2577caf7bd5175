"""What every builtin scheduler shares: the request book-keeping around ``schedule``.

:class:`QueueScheduler` keeps the waiting queue (arrival order; a preempted request goes
back to its front, its KV swapped to host memory when the block manager's swap space takes
it), the running list (admission order, oldest first), the checks that refuse a request which
can never run, and ``update``/``abort``. A subclass writes only
:meth:`~dsr1.interfaces.Scheduler.schedule`. Plain data only: no tensors, no torch.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from dsr1.engine.blocks import BlockManager
from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.request import Request, RequestStatus
from dsr1.errors import Dsr1Error, quote
from dsr1.interfaces import Scheduler


class QueueScheduler(Scheduler):
    """FIFO waiting queue + running list; subclasses decide admission and token counts."""

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # live (waiting or running), by id
        self._finished_since: list[str] = []
        self._blocks: BlockManager | None = None
        self.max_model_len = 0

    # --- setup and intake ------------------------------------------------------------------

    def bind(self, blocks: BlockManager, max_model_len: int) -> None:
        self._blocks = blocks
        self.max_model_len = max_model_len

    @property
    def blocks(self) -> BlockManager:
        if self._blocks is None:
            raise RuntimeError(f"{type(self).__name__} is not bound: the engine calls bind(blocks, max_model_len) "
                               "before adding requests")
        return self._blocks

    def check_request(self, request: Request) -> None:
        """One-line ``Dsr1Error`` when ``request`` can never run here."""
        rid = request.request_id
        if rid in self.requests:
            raise Dsr1Error(f"request id {quote(rid)} is already in use by a live request; give each request a "
                            "unique id")
        if not request.prompt_ids:
            raise Dsr1Error(f"request {quote(rid)} has an empty prompt: it needs at least one token")
        if request.max_tokens < 1:
            raise Dsr1Error(f"request {quote(rid)} has max_tokens={request.max_tokens}; it must be at least 1")
        if request.status is not RequestStatus.WAITING or request.block_ids or request.host_block_ids:
            raise Dsr1Error(f"request {quote(rid)} was already scheduled (status {request.status.value}); add a "
                            "new Request")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.max_model_len:
            raise Dsr1Error(f"request {quote(rid)}: {len(request.prompt_ids)} prompt tokens + max_tokens "
                            f"{request.max_tokens} = {total} exceeds the model's context of {self.max_model_len} "
                            "tokens; shorten the prompt or lower max_tokens")
        blocks = self.blocks
        need = blocks.blocks_needed(total)
        if need > blocks.num_blocks:
            raise Dsr1Error(f"request {quote(rid)}: {total} tokens need {need} KV blocks of {blocks.block_size} "
                            f"but the whole pool holds {blocks.num_blocks}; lower max_tokens or give the KV cache "
                            "more blocks")

    def add(self, request: Request) -> None:
        self.check_request(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # --- after a step ----------------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int],
               stopped: Mapping[str, str]) -> list[Request]:
        done: list[Request] = []
        blocks = self.blocks
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted between schedule and update: nothing to advance
            request.num_computed_tokens += len(s.token_ids)
            blocks.commit(request)
            if not s.sample:
                continue
            if s.request_id not in sampled:
                raise RuntimeError(f"the runner sampled no token for {s.request_id!r}, whose plan row samples")
            request.output_ids.append(int(sampled[s.request_id]))
            if s.request_id in stopped:
                self._finish(request, RequestStatus(stopped[s.request_id]))
                done.append(request)
            elif len(request.output_ids) >= request.max_tokens:
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                done.append(request)
        return done

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = status
        del self.requests[request.request_id]
        self._finished_since.append(request.request_id)

    def abort(self, request_id: str) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            raise Dsr1Error(f"abort: no waiting or running request {quote(request_id)} (unknown, or already "
                            "finished)")
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    # --- helpers for schedule() ------------------------------------------------------------

    def preempt(self, request: Request) -> bool:
        """Back to the front of the waiting queue, device blocks released: True when its KV went to
        the host swap space (it resumes where it stopped), False when its outputs are recomputed later."""
        self.running.remove(request)
        swapped = self.blocks.preempt(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        return swapped

    def output(self, scheduled: Sequence[ScheduledRequest], preempted: Sequence[str],
               finished: tuple[str, ...]) -> SchedulerOutput:
        """The step's plan, carrying the swap copies the block manager queued while it was made."""
        swap_out, swap_in, swapped = self.blocks.take_swaps()
        return SchedulerOutput(tuple(scheduled), tuple(preempted), finished, swap_out, swap_in, swapped)

    def take_finished(self) -> tuple[str, ...]:
        """Ids finished or aborted since the previous call (each reported once)."""
        ids, self._finished_since = tuple(self._finished_since), []
        return ids

    @staticmethod
    def chunk(request: Request, num_tokens: int) -> ScheduledRequest:
        """Plan ``num_tokens`` tokens of ``request`` from its first uncomputed one."""
        start = request.num_computed_tokens
        end = start + num_tokens
        return ScheduledRequest(request.request_id, tuple(request.slice_ids(start, end)), start,
                                tuple(request.block_ids), end == request.num_tokens)

    # --- state -----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def get(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

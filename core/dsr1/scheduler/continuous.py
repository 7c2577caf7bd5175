"""Builtin scheduler ``continuous``: iteration-level batching (Orca, vLLM) over paged KV blocks.

Every step, under a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``):

1. every running request that is decoding gets its one token, oldest first; when the pool
   has no block for one, the NEWEST running request is preempted (blocks freed, back to the
   front of the waiting queue, recomputed later with its outputs as part of its prompt, or,
   when the block manager's swap space takes it, its KV copied to host memory and back on
   readmission) until the older ones fit;
2. a running request still in prefill gets its next chunk;
3. if nothing was preempted, waiting requests are admitted in arrival order, each with a
   prefill chunk of what is left of the budget (or, without ``chunked_prefill``, its whole
   prompt, which must fit the budget unless it runs alone). A request whose prefill is not
   finished stops admission: it continues before anything behind it starts.

No starvation: the oldest running request gets tokens every step and the pool can always hold
it alone (``add`` refuses one that cannot), so it finishes, and then the next oldest. Admission
is strictly FIFO, so a later arrival never overtakes a waiting request. Plain data only.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dsr1.engine.blocks import BlockManager
from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.request import RequestStatus
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.scheduler.base import QueueScheduler
from dsr1.specs import PluginSpec


class ContinuousOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: most requests running (holding KV blocks) at once.
    max_num_seqs: int = Field(default=256, ge=1)
    #: most tokens fed in one step, decodes and prefill chunks together; at least one KV block.
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    #: split long prompts into chunks that share steps with decodes (off: a prompt is prefilled whole).
    chunked_prefill: bool = True


class ContinuousScheduler(QueueScheduler):
    """Admits between decode steps, chunks prefills under a token budget, preempts the newest."""

    Options = ContinuousOptions
    options: ContinuousOptions

    def bind(self, blocks: BlockManager, max_model_len: int) -> None:
        budget = self.options.max_num_batched_tokens
        if budget < blocks.block_size:
            raise Dsr1Error(f"scheduler.options.max_num_batched_tokens = {budget} is smaller than one KV block "
                            f"({blocks.block_size} tokens); set it to at least {blocks.block_size}")
        super().bind(blocks, max_model_len)

    def schedule(self) -> SchedulerOutput:
        finished = self.take_finished()
        plan: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self.options.max_num_batched_tokens
        budget = self._decode(plan, preempted, budget)
        budget, prefilling = self._continue_prefills(plan, budget)
        if not preempted and not prefilling:
            self._admit(plan, budget)
        return self.output(plan, preempted, finished)

    def _decode(self, plan: list[ScheduledRequest], preempted: list[str], budget: int) -> int:
        blocks = self.blocks
        for request in list(self.running):  # a copy: preemption shortens the list
            if budget < 1:
                break
            if request.status is not RequestStatus.RUNNING or request.num_tokens - request.num_computed_tokens != 1:
                continue  # preempted above, or still in prefill
            while not blocks.allocate(request, request.num_computed_tokens + 1):
                # running is in arrival order and this loop goes oldest first, so the newest is
                # never a request already planned this step.
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                plan.append(self.chunk(request, 1))
                budget -= 1
        return budget

    def _continue_prefills(self, plan: list[ScheduledRequest], budget: int) -> tuple[int, bool]:
        """Next chunks of running requests in prefill; also whether one is still unfinished."""
        blocks = self.blocks
        prefilling = False
        for request in self.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining <= 1:
                continue
            n = self._chunk_size(remaining, budget, bool(plan))
            if n and not blocks.allocate(request, request.num_computed_tokens + n):
                # Take what the free blocks hold now rather than stall; the rest comes later.
                fits = blocks.capacity(request) - request.num_computed_tokens
                n = min(n, fits) if self.options.chunked_prefill else 0
                if n > 0 and not blocks.allocate(request, request.num_computed_tokens + n):
                    raise AssertionError("BlockManager.capacity promised blocks that allocate refused")
            if n > 0:
                plan.append(self.chunk(request, n))
                budget -= n
            prefilling = prefilling or n < remaining
        return budget, prefilling

    def _admit(self, plan: list[ScheduledRequest], budget: int) -> None:
        blocks = self.blocks
        while self.waiting and budget > 0 and len(self.running) < self.options.max_num_seqs:
            request = self.waiting[0]
            cached = blocks.cached_tokens(request)  # a cached prefix, or the KV it swapped out
            remaining = request.num_tokens - cached
            n = self._chunk_size(remaining, budget, bool(plan))
            if n == 0 or not blocks.allocate(request, cached + n):
                return  # FIFO: nothing behind the head may overtake it
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.append(self.chunk(request, n))
            budget -= n
            if n < remaining:
                return  # its prefill continues next step, before anything behind it starts

    def _chunk_size(self, remaining: int, budget: int, others: bool) -> int:
        """Tokens of a prefill to feed now (0: not this step)."""
        if self.options.chunked_prefill:
            return max(0, min(remaining, budget))
        if remaining <= budget or not others:
            return remaining  # whole; a prompt over the budget runs alone
        return 0


@hookimpl
def dsr1_scheduler() -> PluginSpec:
    return PluginSpec(
        name="continuous",
        family="scheduler",
        impl=ContinuousScheduler,
        options=ContinuousOptions,
        description="iteration-level batching: chunked prefill under a token budget, preempts the newest",
    )

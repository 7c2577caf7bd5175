"""The engine loop: ``step()`` = ``scheduler.schedule()`` → ``runner.execute(plan)`` →
``scheduler.update(...)`` (the shape of vLLM v1's ``EngineCore.step``).

Requests are plain data owned by the scheduler; the runner owns every tensor; the decoding
family samples (in the runner), detokenizes incrementally and decides stops (here, between
execute and update). One engine serves any number of requests that arrive at any time::

    engine = Engine.from_pretrained("dsr1-tiny")
    rid = engine.add_request("The Python interpreter", SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.delta, end="")

Reasoning models: with ``engine.reasoning`` set (a :class:`~dsr1.decoding.reasoning.ThinkMarkers`),
each output also carries its text split into ``reasoning`` and ``answer`` (and their deltas); a
prompt that ends with the start marker (DeepSeek-R1's template) starts the output in the thinking
block. A request's ``max_thinking_tokens`` gets the markers' ids from the tokenizer here.

KV tier: when the model's pool answers :meth:`~dsr1.interfaces.Pool.kv_swap` with a
:class:`~dsr1.interfaces.SwapPolicy`, a preempted request whose cached tokens the policy would
rather copy than recompute goes to a host swap space and comes back on readmission
(:mod:`dsr1.engine.swap`); ``requests_swapped`` counts them.

Several ranks (``torchrun``): rank 0's engine, given a
:class:`~dsr1.parallel.lockstep.Leader` (:func:`dsr1.parallel.lockstep.lead`), broadcasts each plan and
the requests added and dropped before executing it; the other ranks follow with the same runner.

An engine is driven by one thread at a time (:class:`~dsr1.engine.async_engine.AsyncEngine`
runs it in a background thread and is safe to call from any number of coroutines).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsr1.decoding.detokenize import IncrementalDetokenizer, StopChecker
from dsr1.decoding.reasoning import ReasoningParser, ThinkMarkers, starts_in_thinking, with_thinking_ids
from dsr1.engine.batch_runner import BatchRunner
from dsr1.engine.blocks import BlockManager
from dsr1.engine.paged import PagedKV
from dsr1.engine.request import Request, RequestStatus
from dsr1.engine.runner import PagedRunner, Sampled
from dsr1.engine.swap import SwapSpace, swap_policy
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams, SwapPolicy
from dsr1.models.common import plugin_capabilities
from dsr1.scheduler.static import StaticScheduler

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.parallel.lockstep import Leader

#: what ``Engine.from_pretrained`` selects when the config leaves a family unset.
ENGINE_DEFAULTS = {"scheduler": "continuous", "kvcache": "paged"}
#: default share of the memory the device reports free that the KV pool may take.
KV_MEMORY_FRACTION = 0.8
#: a CPU pool's default ceiling: the machine's memory is shared with the weights and the OS.
CPU_KV_BYTES = 2 << 30


@dataclass
class RequestOutput:
    """What one request produced up to this step (plain data)."""

    request_id: str
    prompt_ids: list[int]
    #: a list once finished; while running, a :class:`Prefix` view (len, index, slice, compare)
    output_ids: Sequence[int]
    new_ids: list[int]
    text: str
    delta: str
    finished: bool = False
    finish_reason: str | None = None
    #: per new token: (sampled token's logprob, [(top id, logprob), ...]); None unless asked for
    logprobs: Sequence[tuple[float, list[tuple[int, float]]]] | None = None
    arrival: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    #: with ``Engine.reasoning`` set: ``text`` split into the thinking block(s) and the answer, and
    #: this step's share of each (``text`` and ``delta`` still hold both); None otherwise.
    reasoning: str | None = None
    reasoning_delta: str | None = None
    answer: str | None = None
    answer_delta: str | None = None

    def after(self, earlier: RequestOutput) -> RequestOutput:
        """This output joined with the one before it, as if both steps' tokens came in this one."""
        joined = dataclasses.replace(self, new_ids=earlier.new_ids + self.new_ids, delta=earlier.delta + self.delta)
        if self.reasoning_delta is not None:
            joined.reasoning_delta = (earlier.reasoning_delta or "") + self.reasoning_delta
            joined.answer_delta = (earlier.answer_delta or "") + (self.answer_delta or "")
        return joined


class _Appended(Sequence[int]):
    """``[*ids, token]`` without copying ``ids`` (a request's outputs, read once per step)."""

    __slots__ = ("ids", "token")

    def __init__(self, ids: list[int], token: int) -> None:
        self.ids, self.token = ids, token

    def __len__(self) -> int:
        return len(self.ids) + 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, int) and (i == len(self.ids) or i == -1):
            return self.token
        return [*self.ids, self.token][i]


class Prefix(Sequence[Any]):
    """The first ``n`` items of an append-only list, without copying them.

    A step's output must not change after it is handed out, but copying a request's whole output
    every step makes a long answer quadratic; the engine only ever appends, so a length fixes it.
    """

    __slots__ = ("items", "n")

    def __init__(self, items: list[Any]) -> None:
        self.items, self.n = items, len(items)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            return self.items[start:stop:step]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.items[i % self.n]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == self.n and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class _Tracked:
    """The engine's side of a request: decoding state that is not the scheduler's business."""

    params: SamplingParams
    detok: IncrementalDetokenizer | None
    stop: StopChecker
    text: str = ""
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    first_token_time: float | None = None
    #: the reasoning split (``Engine.reasoning`` set), and the split deltas not yet handed out
    parser: ReasoningParser | None = None
    reasoning_delta: str = ""
    answer_delta: str = ""


class Engine:
    """Batching over one model: add requests at any time, step until done.

    The runner follows the kvcache plugin: one with the ``paged`` capability gets the
    :class:`PagedRunner` (continuous batching, chunked prefill, prefix caching); any other runs the
    ``static`` scheduler's whole batches on a :class:`BatchRunner` over the plugin's own rows (what
    ``model.generate`` does, passing its own ``runner``). ``detokenize=False`` skips the text (ids only).
    """

    def __init__(self, model: Any, tokenizer: Any = None, num_blocks: int | None = None,
                 scheduler: Any = None, eos_ids: Sequence[int] | None = None,
                 runner: BatchRunner | None = None, detokenize: bool = True) -> None:
        if not hasattr(model, "generate"):  # an encoder a plugin did not declare one (require_causal_lm)
            from dsr1.auto import encoder_error

            raise encoder_error(model.source_dir or type(model).__name__, model.config.get("model_type"))
        runtime = model.runtime
        pipeline = runtime.pipeline
        self.model, self.pipeline = model, pipeline
        self.tokenizer = tokenizer if tokenizer is not None else runtime.tokenizer
        self.detokenize = detokenize
        self.max_model_len = int(model.context_length)
        self.scheduler = scheduler if scheduler is not None else pipeline.scheduler
        kv_name = pipeline.config.choice("kvcache").name
        if runner is None and "paged" not in plugin_capabilities(pipeline, "kvcache"):
            if not isinstance(self.scheduler, StaticScheduler):
                raise Dsr1Error(f"scheduler {type(self.scheduler).__name__} batches over a paged KV pool: kvcache "
                                f"{kv_name!r} has no 'paged' capability; use kvcache 'paged' (or scheduler 'static')")
            runner = BatchRunner(model)
        self.runner: PagedRunner | BatchRunner
        #: the pool's answer to ``kv_swap`` (None: preempted requests are always recomputed)
        self.swap_policy: SwapPolicy | None = None
        if num_blocks is not None and num_blocks < 1:  # 0 is not "size it for me": that is None
            raise Dsr1Error(f"num_blocks must be at least 1 (KV blocks in the pool), got {num_blocks}; leave it out "
                            f"to size the pool from free memory")
        if runner is not None:  # whole batches over the kvcache plugin's rows: a "block" is one row of it
            rows = num_blocks if num_blocks is not None else (self.scheduler.options.max_batch_size
                                  if isinstance(self.scheduler, StaticScheduler) else 256)
            self.block_size, self.num_blocks = self.max_model_len, rows
            self.blocks = BlockManager(rows, self.max_model_len, prefix_caching=False)
            self.runner = runner
        else:
            if model.recurrent:
                raise Dsr1Error("the engine's paged KV cache holds per-token keys and values; recurrent (linear) "
                                "attention keeps fixed-size states instead: use kvcache 'contiguous' (with "
                                "scheduler 'static'), or another attention plugin")
            kv_opts = pipeline.kvcache.options
            block_size = int(getattr(kv_opts, "block_size", 16))
            self.block_size = block_size
            per_block = self._bytes_per_block(block_size)
            chosen = num_blocks if num_blocks is not None else getattr(kv_opts, "num_blocks", None)
            self.num_blocks = chosen if chosen is not None else self._default_blocks(per_block)
            policy = self.swap_policy = swap_policy(pipeline.pool, per_block // block_size, model.device)
            host_blocks = max(0, policy.host_bytes // per_block) if policy is not None else 0
            swap = SwapSpace(host_blocks, policy.should_swap) if policy is not None and host_blocks else None
            self.blocks = BlockManager(self.num_blocks, block_size,
                                       prefix_caching=bool(getattr(kv_opts, "prefix_caching", True)), swap=swap)
            self.runner = PagedRunner(model, pipeline.decoding, self.num_blocks, block_size, self.max_model_len,
                                      host_blocks=host_blocks, pin_host=policy is not None and policy.pin)
        self.scheduler.bind(self.blocks, self.max_model_len)
        #: the batch runner records its batches (prefill, decode) itself, not every step
        self._record_steps = isinstance(self.runner, PagedRunner)
        self.monitor = pipeline.monitor
        #: the monitor's per-step calls, resolved once (None: it watches no steps, and a step pays nothing)
        self._stepper = self.monitor if self.monitor.watches_steps else None
        if self._stepper is not None:
            self._stepper.attach(model)
        defaults = runtime.generation_defaults
        eos = defaults.get("eos_token_id") if eos_ids is None else list(eos_ids)
        self.eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        self.default_params = SamplingParams.from_generation_config(defaults)
        #: thinking markers: outputs split into reasoning and answer (None: text only, as for plain models)
        self.reasoning: ThinkMarkers | None = None
        self.tracked: dict[str, _Tracked] = {}
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._finished_since: list[str] = []
        #: rank 0's side of a launch with several ranks (None: this engine's plans stay in this process)
        self.lockstep: Leader | None = None
        #: how often each request was preempted (recomputed or swapped): plain counts for tests and metrics
        self.requests_preempted: collections.Counter[str] = collections.Counter()
        #: how many of those preemptions swapped the request's KV to host memory instead of dropping it
        self.requests_swapped: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_pretrained(cls, name: str | Path, config: Any = None, num_blocks: int | None = None,
                        **overrides: Any) -> Engine:
        """Load a model with the engine's defaults (scheduler ``continuous``, kvcache ``paged``)
        for the families that neither ``config`` nor ``overrides`` set."""
        from dsr1.auto import AutoModel, require_causal_lm
        from dsr1.config import load_config

        chosen = load_config(config, **overrides)
        require_causal_lm(name, chosen)  # an encoder is refused before its weights load
        for family, name_ in ENGINE_DEFAULTS.items():
            if getattr(chosen, family) is None:
                overrides[family] = name_
        return cls(AutoModel.from_pretrained(name, config, **overrides), num_blocks=num_blocks)

    @classmethod
    def with_scheduler(cls, model: Any, choice: str | Mapping[str, Any], num_blocks: int | None = None,
                       eos_ids: Sequence[int] | None = None) -> Engine:
        """An engine on an already loaded ``model`` with another scheduler plugin (``"static"`` or
        ``{"name": ..., "options": {...}}``): two schedulers compared on the same weights."""
        from dsr1.config import PluginChoice

        scheduler = model.pipeline.registry.make("scheduler", PluginChoice.model_validate(choice))
        return cls(model, num_blocks=num_blocks, scheduler=scheduler, eos_ids=eos_ids)

    def _bytes_per_block(self, block_size: int) -> int:
        a = self.model.args
        return PagedKV.bytes_per_block(a.n_layers, block_size, a.n_kv_heads, a.head_dim, self.model.dtype,
                                       getattr(a, "kv_shared", False))

    def _default_blocks(self, per_block: int) -> int:
        device = self.pipeline.device
        if self.model.device.type == "cpu":
            budget = CPU_KV_BYTES
        else:
            budget = int(device.memory_info().free * KV_MEMORY_FRACTION)
        blocks = max(1, budget // per_block)
        parallel = getattr(self.pipeline.config, "parallel", None)
        if parallel is not None and (parallel.tensor > 1 or getattr(parallel, "pipeline", 1) > 1):
            from dsr1.parallel.lockstep import agree_min, world_group

            group = world_group(self)
            if group is not None:  # every rank's pool holds the same block ids: the smallest one fits all
                blocks = agree_min(blocks, group, self.model.device)
        return blocks

    # --- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text, or token ids); returns its id. Refused at once (one-line
        error) when it can never run: longer than the context, or larger than the KV pool."""
        params = params if params is not None else self.default_params
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise Dsr1Error("a text prompt needs a tokenizer: load the model from a dir with tokenizer.json, "
                                "or pass token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise Dsr1Error("empty prompt: a request needs at least one token")
        vocab = int(self.model.args.vocab_size)
        if min(ids) < 0 or max(ids) >= vocab:
            raise Dsr1Error(f"prompt holds a token id outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise Dsr1Error("stop strings need a tokenizer to read the text: load the model from a dir with "
                            "tokenizer.json, or use stop_token_ids")
        if params.max_thinking_tokens is not None:
            params = with_thinking_ids(params, self.tokenizer, self.reasoning or ThinkMarkers())
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if max_tokens < 1:
            raise Dsr1Error(f"prompt has {len(ids)} tokens, the model's context is {self.max_model_len}: no room to "
                            f"generate")
        request = Request(request_id=rid, prompt_ids=ids, max_tokens=max_tokens, arrival=time.monotonic())
        self.scheduler.add(request)  # refuses what can never fit, and ids in use
        if self.lockstep is not None:
            self.lockstep.added(request, params)
        text = self.tokenizer is not None and (self.detokenize or bool(params.stop))
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) if text else None
        tracked = _Tracked(params, detok, StopChecker(params, self.eos_ids))
        if self.reasoning is not None and detok is not None:
            # the prompt's tail as text: does it open the thinking block (DeepSeek-R1's template)?
            tail = str(self.tokenizer.decode(ids[-8:], skip_special_tokens=False))
            tracked.parser = ReasoningParser(self.reasoning, starts_in_thinking(tail, self.reasoning))
        self.tracked[rid] = tracked
        self.requests[rid] = request
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now; its blocks return to the pool. Unknown ids are a one-line error."""
        if request_id not in self.tracked:
            raise Dsr1Error(f"abort: no running or waiting request {request_id!r}")
        request = self.scheduler.abort(request_id)
        self._finished_since.append(request_id)
        if self.lockstep is not None:
            self.lockstep.dropped([request_id])
        return self._output(request, [], "", finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule → execute → update; the outputs of every request that moved."""
        return self._step(every=True)

    def _step(self, every: bool) -> list[RequestOutput]:
        """:meth:`step`; ``every=False`` builds the outputs of finished requests only (:meth:`run`)."""
        plan = self.scheduler.schedule()
        if self.blocks.swap is not None and self.blocks.swap.pending():
            raise Dsr1Error(f"scheduler {type(self.scheduler).__name__} swapped KV blocks but its plan does not carry "
                            "the copies; build the plan with QueueScheduler.output(...)")
        if self._finished_since:
            self.runner.forget(self._finished_since)
            self._finished_since = []
        self.requests_preempted.update(plan.preempted)
        self.requests_swapped.update(plan.swapped)
        if not plan.scheduled and not (plan.swap_out or plan.swap_in):
            if self.lockstep is not None:
                self.lockstep.idle()
            return []
        started = time.perf_counter()
        params = {s.request_id: self.tracked[s.request_id].params for s in plan.scheduled}
        if self.lockstep is not None:
            self.lockstep.publish(plan)  # the other ranks execute the same plan, collectives in step
        stepper = self._stepper
        with self.model.run_lock.hold("engine step", nested_ok=True):  # a generate elsewhere may be repacking weights
            if stepper is None:
                sampled = self.runner.execute(plan, self.requests, params)
            else:  # inside the lock: steps of two engines on one model (one monitor) never interleave
                context = max((s.start + len(s.token_ids) for s in plan.scheduled), default=0)
                stepper.begin_step(len(plan.scheduled), context, plan.num_tokens)
                try:
                    sampled = self.runner.execute(plan, self.requests, params)
                finally:
                    stepper.end_step()
        stopped: dict[str, str] = {}
        deltas: dict[str, str] = {}
        now = time.monotonic()
        for rid, s in sampled.items():
            deltas[rid], reason = self._decode(rid, s, now)
            if reason is not None:
                stopped[rid] = reason
        tokens = {rid: s.token for rid, s in sampled.items()}
        finished = self.scheduler.update(plan, tokens, stopped)
        if self._record_steps:
            prefill = sum(len(s.token_ids) for s in plan.scheduled if len(s.token_ids) > 1)
            self.monitor.record("engine.step", seconds=time.perf_counter() - started, requests=len(plan.scheduled),
                                tokens=plan.num_tokens, prefill_tokens=prefill, sampled=len(sampled),
                                preempted=len(plan.preempted), swapped=len(plan.swapped),
                                blocks_used=self.num_blocks - self.blocks.num_free())
        done = {r.request_id for r in finished}
        if self.lockstep is not None:
            self.lockstep.sampled(tokens)  # the followers append rank 0's tokens: the ranks never diverge
            self.lockstep.dropped([r.request_id for r in finished])
        outs = [self._output(self.requests[rid], [s.token], deltas[rid], rid in done)
                for rid, s in sampled.items() if every or rid in done]
        if done:
            self.runner.forget(list(done))  # now: the batch runner records a batch as its last request ends
        return outs

    def _decode(self, rid: str, s: Sampled, now: float) -> tuple[str, str | None]:
        t = self.tracked[rid]
        request = self.requests[rid]
        if t.first_token_time is None:
            t.first_token_time = now
        if s.logprob is not None:
            t.logprobs.append((s.logprob, s.top or []))
        reason, visible = t.stop.check(_Appended(request.output_ids, s.token), t.detok)  # feeds the detokenizer
        delta, t.text = visible[len(t.text):], visible  # the visible text only grows
        if t.parser is not None:
            r, a = t.parser.feed(delta)
            t.reasoning_delta += r
            t.answer_delta += a
        return delta, reason

    def _output(self, request: Request, new_ids: list[int], delta: str, finished: bool) -> RequestOutput:
        t = self.tracked[request.request_id]
        status = request.status
        reason = status.value if status.finished else None
        snapshot = list if finished else Prefix
        out = RequestOutput(
            request_id=request.request_id, prompt_ids=request.prompt_ids, output_ids=snapshot(request.output_ids),
            new_ids=new_ids, text=t.text, delta=delta, finished=finished, finish_reason=reason,
            logprobs=snapshot(t.logprobs) if t.params.logprobs is not None else None, arrival=request.arrival,
            first_token_time=t.first_token_time, finished_time=time.monotonic() if finished else None,
        )
        if t.parser is not None:
            r, a = t.parser.flush() if finished else ("", "")
            out.reasoning, out.answer = t.parser.reasoning, t.parser.answer
            out.reasoning_delta, out.answer_delta = t.reasoning_delta + r, t.answer_delta + a
            t.reasoning_delta = t.answer_delta = ""
        if finished:
            del self.tracked[request.request_id]
            del self.requests[request.request_id]
        return out

    def run(self) -> dict[str, RequestOutput]:
        """Step until every request is finished; the final output of each, by id."""
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self._step(every=False):
                final[out.request_id] = out
        return final

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Add every prompt, run them together, return their final outputs in order."""
        many = params if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, many)]
        final = self.run()
        return [final[i] for i in ids]

    def stats(self) -> Mapping[str, Any]:
        """Plain numbers for metrics: running/waiting requests, KV blocks, prefix-cache hits."""
        return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "blocks_total": self.num_blocks, "blocks_used": self.num_blocks - self.blocks.num_free(),
                **self.blocks.stats}


__all__ = ["Engine", "RequestOutput", "RequestStatus", "SamplingParams"]

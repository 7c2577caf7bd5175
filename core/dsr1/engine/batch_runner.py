"""The batch runner: executes the ``static`` scheduler's plans over the model's own KV cache.

The static scheduler starts a batch by prefilling every admitted request whole, then decodes
the same requests one token per step until all have finished. That is exactly the shape of
transformers' ``generate``, and this runner runs it the way ``model.generate`` always has:

* one left-padded ``(B, T0)`` prefill; positions from the attention mask's cumulative sum;
* the selected ``kvcache`` plugin's contiguous rows (any kvcache plugin, compressing and
  recurrent-state ones included), allocated for the batch's longest possible length;
* decode steps through the graph pass's steps (:class:`~dsr1.interfaces.GraphSteps`): the
  captured static step of graph ``cudagraph`` (one replay per token), the compiled step of
  graph ``compile``, or the model's eager ``forward_step``;
* a row that finished keeps its place and is fed the pad id (the batch shape, and with it
  every captured graph and every other row's arithmetic, stays what it was).

Plans are plain data; the tensors (the ``(B, T0 + n)`` token buffer, the key-validity mask,
positions, the finished-row mask) live here for the batch's life. Per decode step the runner
launches the step's kernels (or one graph replay) and reads the sampled ids back once; nothing
is imported, allocated on the host beyond the step's results, or dispatched through pluggy.

The monitor gets what it always got from a batch (``prefill``, ``decode``, ``kvcache.bytes``,
then the ``dsr1_step_finished`` hook), once, when the batch's last request finishes or the
runner is closed.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.request import Request
from dsr1.engine.runner import Sampled
from dsr1.interfaces import SamplingParams
from dsr1.models.common import CausalLM, build_mask


@dataclass
class _Batch:
    """The tensors and counters of the batch in flight."""

    rows: dict[str, int]  # request id -> row
    out: torch.Tensor  # (B, Tmax): padded prompts, then the sampled ids
    cur: int  # column of the last written id
    pos: torch.Tensor  # (B, 1): position of out[:, cur]
    key_valid: torch.Tensor  # (B, Tmax): False at prompt padding
    padded: bool
    graph: Any  # the captured (or static) decode step for this shape, or None
    prompt_tokens: int
    live: set[str] = field(default_factory=set)
    gone: list[int] = field(default_factory=list)  # rows finished since the last step, not yet masked
    unfinished: torch.Tensor | None = None  # (B,) once a row has finished: rows still running
    steps: int = 0  # ids returned per row (prefill's included)
    written: int = 0  # column of the last id written (cur + 1 while a step runs ahead)
    ahead: torch.Tensor | None = None  # (B,) ids of the step launched ahead, not yet returned
    host: torch.Tensor | None = None  # (B,) pinned: where a step's ids are copied without waiting
    copied: Any = None  # CUDA event: the copy into ``host`` is done
    new_tokens: int = 0  # ids handed to the scheduler
    started: float = 0.0
    prefill_s: float = 0.0


class BatchRunner:
    """Executes static plans (whole prefills, then decodes of the same rows) on ``model``.

    :param pad: the id fed to (and written for) rows that have finished.
    :param shared_sampling: ``(params, generator)`` sampling every row as one batch with one
        generator (``model.generate``'s semantics: ``seed`` seeds the call, not each row); None:
        each request samples with its own params and generator, as in the paged engine.
    :param run_ahead: launch each decode step before the previous one's ids are read back (see
        :meth:`_results`; shared sampling only). None: on CUDA, where it overlaps; on a CPU it only
        delays the ids, but tests force it there to check the outputs do not change.
    """

    def __init__(self, model: CausalLM, pad: int = 0,
                 shared_sampling: tuple[SamplingParams, torch.Generator | None] | None = None,
                 run_ahead: bool | None = None) -> None:
        runtime = model.runtime
        pipeline = runtime.pipeline
        self.model, self.pad, self.shared = model, int(pad), shared_sampling
        self.kv, self.decoder, self.device, self.monitor = (pipeline.kvcache, pipeline.decoding, pipeline.device,
                                                            pipeline.monitor)
        self.pipeline = pipeline
        self.steps = runtime.steps
        self.run_ahead = run_ahead
        #: the caller's own padded batch (``model.generate``): prefill runs on it exactly as given
        self.staged: tuple[dict[str, int], torch.Tensor, torch.Tensor | None] | None = None
        self.batch: _Batch | None = None
        self.generators: dict[str, torch.Generator] = {}
        self.shared_generator: torch.Generator | None = None

    def stage(self, request_ids: Sequence[str], input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Prefill these requests from the caller's left-padded ``(N, T0)`` ids and mask (row ``i`` is
        ``request_ids[i]``), so a batch sees exactly the tensors the caller passed."""
        self.staged = ({rid: i for i, rid in enumerate(request_ids)}, input_ids, mask)

    # --- the engine's calls -------------------------------------------------------------------

    def forget(self, request_ids: Sequence[str]) -> None:
        """Requests finished or aborted: their rows are fed the pad id from now on; the batch is
        recorded once none is left."""
        batch = self.batch
        for rid in request_ids:
            self.generators.pop(rid, None)
            if batch is not None and rid in batch.live:
                batch.live.discard(rid)
                batch.gone.append(batch.rows[rid])
        if batch is not None and not batch.live:
            self.close()

    def execute(self, plan: SchedulerOutput, requests: Mapping[str, Request],
                params: Mapping[str, SamplingParams]) -> dict[str, Sampled]:
        self.forget(plan.finished)
        group = plan.scheduled
        batch = self.batch
        if batch is None or any(s.request_id not in batch.rows for s in group):
            if batch is not None:
                raise RuntimeError(f"the batch runner got requests outside its running batch "
                                   f"({[s.request_id for s in group if s.request_id not in batch.rows]}): it "
                                   "runs the static scheduler's whole batches only")
            logits, tok = self._prefill(group, requests, params)
        else:
            with torch.inference_mode():
                logits, tok = self._decode(group, requests, params)
        with torch.inference_mode():
            return self._results(group, logits, tok, requests, params)

    def close(self) -> None:
        """Record the batch in flight (if any) and drop it; the next plan starts a new one."""
        batch, self.batch = self.batch, None
        if batch is None:
            return
        self.device.synchronize()  # a step launched ahead may still run
        decode_s = time.perf_counter() - batch.started if batch.started else 0.0
        monitor, kv = self.monitor, self.kv
        b = batch.out.shape[0]
        monitor.record("prefill", seconds=batch.prefill_s, tokens=batch.prompt_tokens, batch_size=b)
        monitor.record("decode", seconds=decode_s, tokens=batch.new_tokens, steps=batch.steps, batch_size=b)
        monitor.record("kvcache.bytes", bytes=kv.nbytes() + kv.state_nbytes())
        self.pipeline.fire_step_finished({"prompt_tokens": batch.prompt_tokens, "new_tokens": batch.new_tokens,
                                          "prefill_s": batch.prefill_s, "decode_s": decode_s})

    # --- prefill and decode -------------------------------------------------------------------

    def _layout(self, group: Sequence[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's left-padded ``(B, T0)`` ids and mask (None: no padding)."""
        staged = self.staged
        device = self.model.device
        if staged is not None and all(s.request_id in staged[0] for s in group):
            index, ids, mask = staged
            rows = [index[s.request_id] for s in group]
            if rows == list(range(ids.shape[0])):
                return ids, mask
            picked = torch.tensor(rows, device=ids.device)
            return ids[picked], (mask[picked] if mask is not None else None)
        t0 = max(len(s.token_ids) for s in group)
        ids = torch.full((len(group), t0), self.pad, dtype=torch.long)  # (B, T0), left-padded
        m = torch.zeros((len(group), t0), dtype=torch.long)  # (B, T0)
        for i, s in enumerate(group):
            ids[i, t0 - len(s.token_ids) :] = torch.tensor(s.token_ids, dtype=torch.long)
            m[i, t0 - len(s.token_ids) :] = 1
        return ids.to(device), (m.to(device) if not bool(m.all()) else None)

    def _prefill(self, group: Sequence[ScheduledRequest], requests: Mapping[str, Request],
                 params: Mapping[str, SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        if any(s.start != 0 or not s.sample for s in group):
            raise RuntimeError("the batch runner prefills whole prompts from position 0 (the static scheduler's "
                               "plans); use kvcache 'paged' for chunked or prefix-cached prefill")
        model, kv = self.model, self.kv
        ids, attention_mask = self._layout(group)
        b, t0 = ids.shape
        t_max = t0 + max(requests[s.request_id].max_tokens for s in group)
        device = ids.device
        # a compiled step keeps the layout it was first traced on: the device's own, asked for before the first
        # trace (a plain fp32 nn.Linear compiled to MKL's product read at half the panel kernel's speed)
        model.prepare_batch(b, switch=self.steps.decode_step is None)
        kv.allocate(model.cache_shape(b, t_max), model.dtype, device)
        kv.clear_state()
        model.rope.ensure(t_max, model.dtype)
        out = torch.empty((b, t_max), dtype=torch.long, device=device)  # prompt + new, written in place
        out[:, :t0] = ids
        padded = attention_mask is not None
        key_valid = torch.ones((b, t_max), dtype=torch.bool, device=device)  # (B, Tmax) real-token slots
        if attention_mask is not None:
            key_valid[:, :t0] = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T0)
        else:
            positions = torch.arange(t0, device=device).expand(b, t0)
        mask = build_mask(key_valid[:, :t0], t0, 0) if padded else None
        window_mask = None
        w = model.min_window
        if w is not None and (padded or t0 > w):
            window_mask = build_mask(key_valid[:, :t0], t0, 0, w)
        graphs = self.steps.decode_graphs  # graph 'cudagraph': a static, captured decode step
        graph = graphs.runner(model, kv, key_valid) if graphs is not None else None
        rows = {s.request_id: i for i, s in enumerate(group)}
        prompt_tokens = int(attention_mask.sum()) if attention_mask is not None else b * t0
        batch = _Batch(rows, out, t0, positions[:, -1:] + 1, key_valid, padded, graph, prompt_tokens, set(rows))
        self.batch = batch
        started = time.perf_counter()
        # The batch's buffers (cache, out, key_valid, graph inputs) were made outside inference mode,
        # as ever: a kvcache plugin may update its own bookkeeping in place after the call.
        with torch.inference_mode():
            logits = model.forward_step(ids, positions, 0, kv, mask, window_mask, True)  # (B, V)
            tok = self._sample(logits, out[:, :t0], group, requests, params)
            out[:, t0] = tok
            self.device.synchronize()
        batch.prefill_s = time.perf_counter() - started
        batch.started = time.perf_counter()
        batch.steps = 1
        batch.written = t0
        ahead = out.is_cuda if self.run_ahead is None else self.run_ahead
        if self.shared is not None and ahead:  # the decode steps may run one ahead (see _results)
            batch.host = torch.empty(b, dtype=torch.long, pin_memory=out.is_cuda)  # (B,)
            batch.copied = torch.cuda.Event() if out.is_cuda else None
        return logits, tok

    def _decode(self, group: Sequence[ScheduledRequest], requests: Mapping[str, Request],
                params: Mapping[str, SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch
        assert batch is not None
        if any(len(s.token_ids) != 1 for s in group):
            raise RuntimeError("the batch runner decodes one token per request per step (the static scheduler's "
                               "plans)")
        gone, batch.gone = batch.gone, []
        if gone:  # rows finished since the last step: fed the pad id from now on
            if batch.unfinished is None:
                batch.unfinished = torch.ones(batch.out.shape[0], dtype=torch.bool, device=batch.out.device)
            batch.unfinished[gone] = False
        ahead, batch.ahead = batch.ahead, None
        if ahead is None:
            logits, tok = self._forward_next(batch, group, requests, params)
        else:  # launched last step, before those rows were known to be finished: they are fed the pad id
            logits, tok = None, ahead  # (their ids in ``tok`` are returned to no one)
            if gone:
                batch.out[gone, batch.written] = self.pad
        batch.cur = batch.written
        batch.steps += 1
        return logits, tok

    def _forward_next(self, batch: _Batch, group: Sequence[ScheduledRequest], requests: Mapping[str, Request],
                      params: Mapping[str, SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the last written column, sample the next one and write it: logits ``(B, V)``, ids ``(B,)``."""
        c, out = batch.written, batch.out
        if batch.graph is not None:
            logits = batch.graph(out[:, c : c + 1], batch.pos, c)  # (B, V), the graph's output buffer
        else:
            step = self.steps.decode_step or self.model.forward_step
            ids = out[:, c : c + 1]  # (B, 1) view: its row stride is the batch's longest length
            step_mask = batch.key_valid[:, None, None, : c + 1] if batch.padded else None  # (B, 1, 1, S) view
            if self.steps.decode_step is not None:
                # dynamo guards on strides: the view made a generate of another max_new_tokens than the first
                # compile the step once more; a contiguous copy (B ids) has the same strides every time
                ids = ids.clone(memory_format=torch.contiguous_format)
            logits = step(ids, batch.pos, c, self.kv, step_mask, step_mask, True)  # (B, V)
        batch.pos += 1
        tok = self._sample(logits, out[:, : c + 1], group, requests, params)
        if batch.unfinished is not None:
            tok = torch.where(batch.unfinished, tok, self.pad)
        out[:, c + 1] = tok
        batch.written = c + 1
        return logits, tok

    # --- sampling -----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, generated: torch.Tensor, group: Sequence[ScheduledRequest],
                requests: Mapping[str, Request], params: Mapping[str, SamplingParams]) -> torch.Tensor:
        """Next ids ``(B,)`` for every row of the batch (finished rows' ids are replaced by the pad id)."""
        if self.shared is not None:
            shared, gen = self.shared
            return self.decoder.next_token(logits.float(), generated, shared, gen)  # (B,)
        batch = self.batch
        assert batch is not None
        rows = [batch.rows[s.request_id] for s in group]
        reqs = [requests[s.request_id] for s in group]
        ps = [params[s.request_id] for s in group]
        gens = [self._generator(r.request_id, p) for r, p in zip(reqs, ps)]
        picked = self.decoder.next_tokens(logits[rows].float(), [r.output_ids for r in reqs],
                                          [r.prompt_ids for r in reqs], ps, gens)  # (R,)
        tok = torch.full((logits.shape[0],), self.pad, dtype=torch.long, device=logits.device)  # (B,)
        tok[rows] = picked
        return tok

    def _generator(self, rid: str, p: SamplingParams) -> torch.Generator | None:
        if p.greedy:
            return None
        if p.seed is None:
            if self.shared_generator is None:
                self.shared_generator = torch.Generator(device=self.model.device)
            return self.shared_generator
        gen = self.generators.get(rid)
        if gen is None:
            gen = self.generators[rid] = torch.Generator(device=self.model.device).manual_seed(int(p.seed))
        return gen

    def _results(self, group: Sequence[ScheduledRequest], logits: torch.Tensor | None, tok: torch.Tensor,
                 requests: Mapping[str, Request], params: Mapping[str, SamplingParams]) -> dict[str, Sampled]:
        """The step's ids as plain data (its one wait for the device).

        With one shared sampling on CUDA, the next decode step is launched before the wait: its
        input is already on the device, so the GPU computes it while the engine does its
        bookkeeping of this one (vLLM's async scheduling). A row that finishes meanwhile gets the
        pad id written over its run-ahead id (:meth:`_decode`); rows' arithmetic is independent,
        so the others are exactly what they would have been. Not past the batch's last column,
        nor when logprobs are asked for (they read this step's logits, which the graph reuses).
        """
        batch = self.batch
        assert batch is not None
        logprobs = any(params[s.request_id].logprobs is not None for s in group)
        if batch.host is not None and not logprobs and batch.written + 1 < batch.out.shape[1]:
            batch.host.copy_(tok, non_blocking=True)
            if batch.copied is not None:
                batch.copied.record()
            batch.ahead = self._forward_next(batch, group, requests, params)[1]
            if batch.copied is not None:
                batch.copied.synchronize()
            picked = batch.host.tolist()
        else:
            picked = tok.tolist()  # the step's one host sync
        rows = batch.rows
        result = {s.request_id: Sampled(picked[rows[s.request_id]]) for s in group}
        batch.new_tokens += len(group)
        want = [s for s in group if params[s.request_id].logprobs is not None]
        if want and logits is not None:  # the model's raw logprobs, as the paged runner returns them
            index = [rows[s.request_id] for s in want]
            n = max(int(params[s.request_id].logprobs or 0) for s in want)
            chosen, top_ids, top_lp = self.decoder.logprobs(logits[index], tok[index], n)
            for j, s in enumerate(want):
                k = int(params[s.request_id].logprobs or 0)
                out = result[s.request_id]
                out.logprob = float(chosen[j])
                out.top = list(zip(top_ids[j, :k].tolist(), top_lp[j, :k].tolist()))
        return result

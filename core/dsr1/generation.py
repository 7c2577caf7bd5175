"""The generate loop: schedule → prefill → decode, one scheduler step per batch.

Semantics follow transformers' ``generate``: left-padded batches get positions from the
attention mask's cumulative sum, finished rows are filled with the pad id, and the result
is ``(batch, prompt + new)``. The loop calls only plain objects resolved at build time
(``pipeline.kvcache``, ``pipeline.decoding``, ``pipeline.scheduler``, ``pipeline.monitor``);
the decode step allocates nothing per token beyond the tensors the math needs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import torch

from dsr1.errors import Dsr1Error
from dsr1.interfaces import Request, SamplingParams
from dsr1.models.common import CausalLM, build_mask
from dsr1.scheduler.static import StaticScheduler


def _check_params(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float, do_sample: bool
) -> SamplingParams:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise Dsr1Error(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise Dsr1Error(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise Dsr1Error(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise Dsr1Error(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not repetition_penalty > 0:
        raise Dsr1Error(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    return SamplingParams(
        do_sample=bool(do_sample) and temperature > 0,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        repetition_penalty=float(repetition_penalty),
    )


def _check_inputs(
    model: CausalLM, input_ids: Any, attention_mask: Any, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise Dsr1Error(f"empty prompt: input_ids must be (batch, tokens) with at least one token, "
                        f"got shape {tuple(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise Dsr1Error(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                            f"{tuple(input_ids.shape)}")
        attention_mask = attention_mask.to(device)
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise Dsr1Error(f"empty prompt: row {empty[0]} of attention_mask has no tokens")
        if bool(attention_mask.all()):
            attention_mask = None
    t = input_ids.shape[1]
    ctx = model.context_length
    if t > ctx:
        raise Dsr1Error(f"prompt has {t} tokens, longer than the model's context of {ctx} tokens")
    if t + max_new_tokens > ctx:
        raise Dsr1Error(f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                        f"{ctx} tokens; lower max_new_tokens to at most {ctx - t}")
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise Dsr1Error(f"input_ids hold a token id outside the vocabulary [0, {vocab})")
    return input_ids, attention_mask


def generate(
    model: CausalLM,
    input_ids: Any,
    attention_mask: Any = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    stream: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    ignore_eos: bool = False,
) -> Any:
    """Generate up to ``max_new_tokens`` per row.

    Returns a ``(batch, prompt + new)`` LongTensor, or with ``stream=True`` an iterator of
    text pieces (one prompt only; needs ``model.tokenizer``). ``ignore_eos`` forces the full
    length (benchmarks). ``stop`` strings end a row once its new text contains one.

    Thread-safe by serialisation: calls on one model run one at a time under ``model.run_lock``
    (a stream holds it from its first piece until it ends or is closed); inputs are checked
    before waiting for it.
    """
    params = _check_params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise Dsr1Error(f"seed must be an integer in [0, 2**64), got {str(seed)[:40]}")
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    tokenizer = getattr(model, "tokenizer", None)
    if (stream or stops) and tokenizer is None:
        raise Dsr1Error("stream=True and stop strings need a tokenizer: load the model from a dir with tokenizer.json "
                        "or set model.tokenizer")
    if stream and input_ids.shape[0] != 1:
        raise Dsr1Error(f"stream=True takes one prompt, got a batch of {input_ids.shape[0]}")
    defaults = getattr(model, "generation_defaults", {}) or {}
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    eos = [] if ignore_eos or eos_token_id is None else (
        [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id")
    pad = int(pad_token_id if pad_token_id is not None else (eos[0] if eos else 0))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    if not isinstance(model.pipeline.scheduler, StaticScheduler):  # continuous batching: the engine loop
        from dsr1.engine.generate import generate_on_engine

        return generate_on_engine(model, input_ids, attention_mask, params, max_new_tokens, seed, stops, eos, pad,
                                  ignore_eos, stream)
    run = _Run(model, params, generator, eos, pad, stops)
    if stream:
        return _stream_text(run, input_ids, attention_mask, max_new_tokens)
    with model.run_lock.hold():  # the run uses the model's one KV cache, layout, graphs and scheduler
        return run.all(input_ids, attention_mask, max_new_tokens)


class _Run:
    """One generate call: the scheduler's batches, run one after the other."""

    def __init__(
        self, model: CausalLM, params: SamplingParams, generator: torch.Generator | None,
        eos: list[int], pad: int, stops: list[str],
    ) -> None:
        self.model, self.params, self.generator = model, params, generator
        self.eos, self.pad, self.stops = eos, pad, stops
        self.pipeline = model.pipeline
        self.step_fn: Callable[..., torch.Tensor] = getattr(model, "compiled_step", None) or model.forward_step

    def all(self, input_ids: torch.Tensor, mask: torch.Tensor | None, n_new: int) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        rows_ids = input_ids.tolist()
        rows_mask = mask.tolist() if mask is not None else None
        for row, ids_row in enumerate(rows_ids):  # plain data for the scheduler: no tensors
            prompt = [t for t, m in zip(ids_row, rows_mask[row]) if m] if rows_mask is not None else ids_row
            scheduler.add(Request(request_id=row, prompt_ids=prompt, max_new_tokens=n_new))
        results: dict[int, torch.Tensor] = {}
        try:
            while scheduler.has_pending():
                batch = scheduler.next_batch()
                if not batch:
                    break
                rows = [r.request_id for r in batch]
                if rows == list(range(input_ids.shape[0])):
                    ids, m = input_ids, mask
                else:
                    index = torch.tensor(rows, device=input_ids.device)
                    ids, m = input_ids[index], (mask[index] if mask is not None else None)
                out = self.batch(ids, m, n_new)
                new_ids = out[:, ids.shape[1] :].tolist()
                for i, request in enumerate(batch):
                    request.output_ids = new_ids[i]
                    request.finished = True
                    results[request.request_id] = out[i]
        finally:
            while scheduler.has_pending():  # an error mid-way must not leave requests for the next call
                if not scheduler.next_batch():
                    break
        if len(results) == 1:
            return results[0][None]
        width = max(r.shape[0] for r in results.values())
        full = torch.full((input_ids.shape[0], width), self.pad, dtype=torch.long, device=input_ids.device)
        for row, r in results.items():
            full[row, : r.shape[0]] = r
        return full

    def batch(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Prefill then decode one batch; returns ``(B, T0 + n)`` with ``n <= n_new``."""
        steps = self.steps(ids, attention_mask, n_new)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: torch.Tensor = done.value
                return result

    def steps(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None, n_new: int
    ) -> Generator[torch.Tensor, None, torch.Tensor]:
        """Yields each new token ``(B,)``; returns ``(B, T0 + n)``. Stats are recorded once, at the end."""
        model, pipeline = self.model, self.pipeline
        kv, decoder, params, gen = pipeline.kvcache, pipeline.decoding, self.params, self.generator
        b, t0 = ids.shape
        t_max = t0 + n_new
        device = ids.device
        model.prepare_batch(b)
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
        graphs = getattr(model, "decode_graphs", None)  # graph 'cudagraph': a static, captured decode step
        runner = graphs.runner(model, kv, key_valid) if graphs is not None else None
        tracking = bool(self.eos) or bool(self.stops)
        eos_t = torch.tensor(self.eos, device=device) if self.eos else None
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        counts = torch.zeros(b, dtype=torch.long, device=device)
        n = 0
        prefill_s = decode_s = 0.0
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = model.forward_step(ids, positions, 0, kv, mask, window_mask, True)  # (B, V)
                tok = decoder.next_token(logits.float(), out[:, :t0], params, gen)  # (B,)
                pipeline.device.synchronize()
                prefill_s = time.perf_counter() - started
                started = time.perf_counter()
                pos = positions[:, -1:] + 1  # (B, 1)
                step_fn = self.step_fn
                for i in range(n_new):
                    cur = t0 + i
                    if tracking:
                        tok = torch.where(unfinished, tok, self.pad)
                        counts += unfinished
                    out[:, cur] = tok
                    n = i + 1
                    yield tok
                    if eos_t is not None:
                        unfinished &= ~torch.isin(tok, eos_t)
                    if self.stops:
                        self._check_stops(out, t0, cur + 1, unfinished)
                    if n == n_new or (tracking and not bool(unfinished.any())):
                        break
                    if runner is not None:
                        logits = runner(out[:, cur : cur + 1], pos, cur)  # (B, V), the graph's output buffer
                    else:
                        step_mask = key_valid[:, None, None, : cur + 1] if padded else None  # (B, 1, 1, S) view
                        logits = step_fn(out[:, cur : cur + 1], pos, cur, kv, step_mask, step_mask, True)  # (B, V)
                    pos += 1
                    tok = decoder.next_token(logits.float(), out[:, : cur + 1], params, gen)
                pipeline.device.synchronize()
                decode_s = time.perf_counter() - started
        finally:
            self._finish(b, t0, n, attention_mask, counts if tracking else None, prefill_s, decode_s)
        return out[:, : t0 + n]

    def _finish(
        self, b: int, t0: int, n: int, attention_mask: torch.Tensor | None, counts: torch.Tensor | None,
        prefill_s: float, decode_s: float,
    ) -> None:
        """Record the step once: monitor events and the ``dsr1_step_finished`` hook."""
        pipeline = self.pipeline
        new_tokens = int(counts.sum()) if counts is not None else b * n
        prompt_tokens = int(attention_mask.sum()) if attention_mask is not None else b * t0
        monitor = pipeline.monitor
        monitor.record("prefill", seconds=prefill_s, tokens=prompt_tokens, batch_size=b)
        monitor.record("decode", seconds=decode_s, tokens=new_tokens, steps=n, batch_size=b)
        monitor.record("kvcache.bytes", bytes=pipeline.kvcache.nbytes() + pipeline.kvcache.state_nbytes())
        pipeline.fire_step_finished(
            {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_s": prefill_s, "decode_s": decode_s}
        )

    def _check_stops(self, out: torch.Tensor, t0: int, end: int, unfinished: torch.Tensor) -> None:
        tokenizer = self.model.tokenizer
        for row in unfinished.nonzero().flatten().tolist():
            text = tokenizer.decode(out[row, t0:end].tolist(), skip_special_tokens=True)
            if any(s in text for s in self.stops):
                unfinished[row] = False


def _stream_text(run: _Run, ids: torch.Tensor, mask: torch.Tensor | None, n_new: int) -> Iterator[str]:
    """Text pieces as tokens arrive (incremental detokenization, holding back partial UTF-8).

    Holds the model's run lock from the first piece until the stream ends or is closed (or
    garbage-collected): other threads' generate calls on the model wait for it meanwhile.
    """
    tokenizer = run.model.tokenizer
    eos = set(run.eos)
    generated: list[int] = []
    emitted = 0
    with run.model.run_lock.hold():
        steps = run.steps(ids, mask, n_new)
        try:
            for tok in steps:
                token = int(tok[0])
                if token in eos:
                    break
                generated.append(token)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete multi-byte character: wait for the next token
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
        finally:
            steps.close()  # records the step's stats even when the consumer stops early

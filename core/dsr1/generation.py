"""``model.generate``: the HF-style API, a thin client of the engine loop.

Semantics follow transformers' ``generate``: left-padded batches get positions from the
attention mask's cumulative sum, finished rows are filled with the pad id, and the result
is ``(batch, prompt + new)``. This module checks the arguments (one-line errors, before any
work) and resolves the eos/pad ids; :mod:`dsr1.engine.generate` turns every row into a request
of an :class:`~dsr1.engine.engine.Engine` and steps it until done: with scheduler ``static``
on a :class:`~dsr1.engine.batch_runner.BatchRunner` (the kvcache plugin's rows, the graph pass's
captured decode step), with ``continuous`` on the paged runner.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams
from dsr1.models.common import CausalLM


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
    vocab = int(model.args.vocab_size)
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
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
    max_thinking_tokens: int | None = None,
) -> Any:
    """Generate up to ``max_new_tokens`` per row.

    Returns a ``(batch, prompt + new)`` LongTensor, or with ``stream=True`` an iterator of
    text pieces (one prompt only; needs ``model.tokenizer``). ``ignore_eos`` forces the full
    length (benchmarks). ``stop`` strings end a row once its new text contains one.
    ``max_thinking_tokens`` bounds a reasoning model's thinking block: once it holds that many
    tokens, ``</think>`` is forced and the answer follows (a tokenizer without thinking markers:
    a :class:`~dsr1.decoding.reasoning.ThinkingBudgetWarning`, and no budget).

    Thread-safe by serialisation: calls on one model run one at a time under ``model.run_lock``
    (a stream holds it from its first piece until it ends or is closed); inputs are checked
    before waiting for it.
    """
    from dsr1.engine.generate import generate_on_engine

    params = _check_params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise Dsr1Error(f"seed must be an integer in [0, 2**64), got {str(seed)[:40]}")
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    if max_thinking_tokens is not None:
        from dsr1.decoding.reasoning import with_thinking_ids

        params = with_thinking_ids(SamplingParams(**params.model_dump(exclude_unset=True),
                                                  max_thinking_tokens=max_thinking_tokens), model.runtime.tokenizer)
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    runtime = model.runtime
    if (stream or stops) and runtime.tokenizer is None:
        raise Dsr1Error("stream=True and stop strings need a tokenizer: load the model from a dir with tokenizer.json "
                        "or set model.runtime.tokenizer")
    if stream and input_ids.shape[0] != 1:
        raise Dsr1Error(f"stream=True takes one prompt, got a batch of {input_ids.shape[0]}")
    defaults = runtime.generation_defaults
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    eos = [] if ignore_eos or eos_token_id is None else (
        [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id")
    pad = int(pad_token_id if pad_token_id is not None else (eos[0] if eos else 0))
    return generate_on_engine(model, input_ids, attention_mask, params, max_new_tokens, seed, stops, eos, pad,
                              ignore_eos, stream)

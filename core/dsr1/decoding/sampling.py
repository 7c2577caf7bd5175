"""Builtin decoding plugin ``sampling``: greedy, temperature, top-k, top-p, min-p, penalties.

The order and the edge cases are those of transformers' logits processors: repetition
penalty, then (when sampling) temperature → top-k → top-p → min-p, then a multinomial draw
from the softmax with the caller's seeded ``torch.Generator``. Ties at the top-k threshold
are kept; top-p and min-p always keep the most likely token.

Two steps come from elsewhere and run first: a request's logits processors (vLLM's
``(output_ids, logits (V,)) -> logits (V,)`` hook for constrained output, applied before
everything else, per row) and OpenAI's presence/frequency penalties over the output ids
(after the repetition penalty, as vLLM orders them).

One step comes last: a request with a thinking budget (``max_thinking_tokens``) gets the end
marker's ids forced once its thinking block is full (:func:`dsr1.decoding.reasoning.forced_token`);
requests without one pay a ``None`` check.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dsr1.decoding.reasoning import budget_window, forced_token
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Decoder, SamplingParams
from dsr1.specs import PluginSpec


def apply_logits_processors(
    logits: torch.Tensor, outputs: Sequence[Sequence[int]], params: SamplingParams
) -> torch.Tensor:
    """Each row through ``params.logits_processors`` in order, on that row's output ids.

    The rows are copies: a processor that edits in place (as many do) never touches the
    caller's logits, which the engine still reads for logprobs."""
    rows = []
    for row, out in zip(logits, outputs):  # row: (V,)
        row = row.clone()
        ids = list(out)
        for proc in params.logits_processors:
            got = proc(ids, row)
            if not isinstance(got, torch.Tensor) or got.shape != row.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise Dsr1Error(f"logits processor {getattr(proc, '__name__', type(proc).__name__)!r} returned "
                                f"{shape}; it must return the logits tensor of shape {tuple(row.shape)}")
            row = got
        rows.append(row)
    return torch.stack(rows)  # (B, V)


def apply_repetition_penalty(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by ``penalty``."""
    score = torch.gather(logits, 1, generated)  # (B, L)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, generated, score)


def apply_openai_penalties(
    logits: torch.Tensor, outputs: Sequence[Sequence[int]], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``,
    ``count`` over each row's output ids (not the prompt)."""
    vocab = logits.shape[-1]
    counts = torch.stack([
        torch.bincount(torch.as_tensor(list(out), dtype=torch.long), minlength=vocab)[:vocab] for out in outputs
    ]).to(device=logits.device, dtype=logits.dtype)  # (B, V)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (and any tied with the k-th); the rest → -inf."""
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # (B, V), ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False  # the most likely token always stays
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the row's top probability
    (transformers' ``MinPLogitsWarper``; the top token always passes since ``min_p <= 1``)."""
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution's logits: temperature, then top-k, top-p and min-p."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0.0:
        logits = min_p_filter(logits, params.min_p)
    return logits


def force_thinking_end(tokens: torch.Tensor, rows: Sequence[Sequence[int]], params: SamplingParams) -> torch.Tensor:
    """``tokens`` ``(B,)`` with the end marker's next id where a row's thinking block is full;
    ``rows[i]`` are row ``i``'s last ids (prompt then output, :func:`budget_window` of them)."""
    budget = params.max_thinking_tokens
    assert budget is not None
    for i, ids in enumerate(rows):
        forced = forced_token(ids, budget, params.think_start_ids, params.think_end_ids)
        if forced is not None:
            tokens[i] = forced
    return tokens


def process(
    logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
    outputs: Sequence[Sequence[int]] | None,
) -> torch.Tensor:
    """Logits processors, repetition penalty, presence/frequency penalties: the logits greedy
    decoding takes the maximum of, and sampling warps."""
    needs_outputs = bool(params.logits_processors) or params.presence_penalty != 0.0 or (
        params.frequency_penalty != 0.0)
    if needs_outputs and (outputs is None or len(outputs) != logits.shape[0]):
        raise Dsr1Error("logits_processors, presence_penalty and frequency_penalty act on each row's output ids: "
                        "pass outputs=[ids of row 0, ...] to next_token, or call next_tokens")
    if params.logits_processors:
        logits = apply_logits_processors(logits, outputs or [], params)
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, generated, params.repetition_penalty)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        logits = apply_openai_penalties(logits, outputs or [], params.presence_penalty, params.frequency_penalty)
    return logits


class SamplingDecoder(Decoder):
    """Greedy (``do_sample=False`` or ``temperature=0``) or sampled next tokens with transformers semantics."""

    def next_token(
        self,
        logits: torch.Tensor,
        generated: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        logits = process(logits, generated, params, outputs)
        if params.greedy:
            tokens = logits.max(dim=-1).indices  # (B,): the first maximum, as argmax, in a faster CPU kernel
        else:
            probs = warp(logits, params).softmax(dim=-1)  # (B, V)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        if params.max_thinking_tokens is not None and params.think_end_ids and generated.shape[1]:
            # generated: (B, L) prompt + output ids (a whole batch sharing these params)
            w = budget_window(params.max_thinking_tokens, params.think_start_ids, params.think_end_ids)
            tokens = force_thinking_end(tokens, generated[:, -w:].tolist(), params)
        return tokens

    def next_tokens(
        self,
        logits: torch.Tensor,
        outputs: Sequence[list[int]],
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        tokens = super().next_tokens(logits, outputs, prompts, params, generators)
        for i, p in enumerate(params):
            if p.max_thinking_tokens is None or not p.think_end_ids:
                continue
            w = budget_window(p.max_thinking_tokens, p.think_start_ids, p.think_end_ids)
            out = outputs[i]
            tail = list(out[-w:])
            if len(tail) < w:
                tail = [*prompts[i][len(tail) - w:], *tail]
            forced = forced_token(tail, p.max_thinking_tokens, p.think_start_ids, p.think_end_ids)
            if forced is not None:
                tokens[i] = forced
        return tokens

    def generated_ids(
        self, like: torch.Tensor, prompt: Sequence[int], output: Sequence[int], params: SamplingParams
    ) -> torch.Tensor:
        # only the repetition penalty reads prompt + output: a sampled row of a 2k-token prompt must
        # not copy its prompt every step for nothing
        if params.repetition_penalty != 1.0:
            return like.new_tensor([[*prompt, *output]])  # (1, L)
        return like.new_zeros((1, 0))  # (1, 0): nothing seen


@hookimpl
def dsr1_decoding() -> PluginSpec:
    return PluginSpec(
        name="sampling",
        family="decoding",
        impl=SamplingDecoder,
        capabilities=frozenset({
            "greedy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "logits_processors", "logprobs", "per_row_params", "seeded", "thinking_budget",
        }),
        description="greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency penalties and "
                    "logits processors (transformers and OpenAI semantics), per request",
    )

"""Builtin decoding plugin ``sampling``: greedy, temperature, top-k, top-p, repetition penalty.

The order and the edge cases are those of transformers' logits processors: repetition
penalty, then (when sampling) temperature → top-k → top-p, then a multinomial draw from
the softmax with the caller's seeded ``torch.Generator``. Ties at the top-k threshold are
kept; top-p always keeps at least the most likely token.
"""
from __future__ import annotations

import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Decoder, SamplingParams
from dsr1.specs import PluginSpec


def apply_repetition_penalty(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by ``penalty``."""
    score = torch.gather(logits, 1, generated)  # (B, L)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, generated, score)


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


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution's logits: temperature, then top-k, then top-p."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


class SamplingDecoder(Decoder):
    """Greedy (``do_sample=False``) or sampled next tokens with transformers semantics."""

    def next_token(
        self,
        logits: torch.Tensor,
        generated: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, generated, params.repetition_penalty)
        if not params.do_sample:
            return logits.max(dim=-1).indices  # (B,): the first maximum, as argmax, in a faster CPU kernel
        probs = warp(logits, params).softmax(dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


@hookimpl
def dsr1_decoding() -> PluginSpec:
    return PluginSpec(
        name="sampling",
        family="decoding",
        impl=SamplingDecoder,
        capabilities=frozenset({"greedy", "temperature", "top_k", "top_p", "repetition_penalty", "seeded"}),
        description="greedy, temperature, top-k, top-p and repetition penalty (transformers semantics)",
    )

"""The decoding kit's oracle: a slow, obviously correct sampler over ONE row of logits.

Everything runs in float64 Python-level steps, in transformers' order (the order
:class:`dsr1.interfaces.SamplingParams` documents): logits processors → repetition penalty
(prompt + output ids) → presence/frequency penalties (output ids) → greedy argmax, or
temperature → top-k (ties with the k-th kept) → top-p (the smallest most-likely set whose
mass reaches ``top_p``; the most likely token always stays) → min-p (probability at least
``min_p`` times the top one's) → the softmax the draw comes from.

:func:`reference_probs` also returns the tokens that sit within a rounding error of a
top-p / min-p threshold (``ambiguous``): a float32 implementation may keep or drop those,
so the kit's support check accepts them either way.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsr1.interfaces import SamplingParams

#: relative distance to a top-p / min-p threshold under which a token's fate is a rounding question.
THRESHOLD_EPS = 1e-6


def processed_logits(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> list[float]:
    """Logits processors, then the repetition and presence/frequency penalties, one token at a time."""
    row = logits.detach().to("cpu", torch.float64).clone()  # (V,)
    for proc in params.logits_processors:
        row = proc(list(output), row.clone()).to(torch.float64)
    values = [float(x) for x in row]
    if params.repetition_penalty != 1.0:
        for t in set(int(i) for i in (*prompt, *output)):
            v = values[t]
            values[t] = v * params.repetition_penalty if v < 0 else v / params.repetition_penalty
    counts = Counter(int(i) for i in output)
    for t, c in counts.items():
        values[t] -= params.presence_penalty + params.frequency_penalty * c
    return values


def reference_greedy(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> int:
    """The greedy token: the first maximum of the processed logits."""
    values = processed_logits(logits, params, prompt, output)
    best = max(values)
    return values.index(best)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    if top == -math.inf:
        return [0.0] * len(values)
    exp = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exp)
    return [e / total for e in exp]


@dataclass(frozen=True)
class Reference:
    """The sampling distribution of one row: ``probs`` (sums to 1) and the threshold-ambiguous tokens."""

    probs: list[float]
    ambiguous: frozenset[int]

    @property
    def support(self) -> frozenset[int]:
        return frozenset(i for i, p in enumerate(self.probs) if p > 0)


def reference_probs(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> Reference:
    """The distribution a sampled ``next_token`` draws from for this row (greedy: all mass on the argmax)."""
    if params.greedy:
        token = reference_greedy(logits, params, prompt, output)
        probs = [0.0] * logits.shape[-1]
        probs[token] = 1.0
        return Reference(probs, frozenset())
    values = processed_logits(logits, params, prompt, output)
    if params.temperature != 1.0:
        values = [v / params.temperature for v in values]
    ambiguous: set[int] = set()
    if params.top_k > 0:
        k = min(params.top_k, len(values))
        kth = sorted(values, reverse=True)[k - 1]
        values = [v if v >= kth else -math.inf for v in values]
    if params.top_p < 1.0:
        probs = _softmax(values)
        top = max(range(len(probs)), key=lambda i: probs[i])
        keep = []
        for i, p in enumerate(probs):
            # transformers: drop a token when the mass of tokens no likelier than it is <= 1 - top_p
            below = sum(q for q in probs if q <= p)
            if abs(below - (1 - params.top_p)) <= THRESHOLD_EPS * 10:
                ambiguous.add(i)
            keep.append(i == top or below > 1 - params.top_p)
        values = [v if k else -math.inf for v, k in zip(values, keep)]
    if params.min_p > 0.0:
        probs = _softmax(values)
        threshold = params.min_p * max(probs)
        for i, p in enumerate(probs):
            if p > 0 and abs(p - threshold) <= THRESHOLD_EPS * max(probs):
                ambiguous.add(i)
        values = [v if p >= threshold else -math.inf for v, p in zip(values, probs)]
    return Reference(_softmax(values), frozenset(ambiguous))


def reference_logprobs(logits: torch.Tensor) -> list[float]:
    """``log_softmax`` of a raw row in float64 (what ``Decoder.logprobs`` reports for the engine)."""
    values = [float(x) for x in logits.detach().to("cpu", torch.float64)]
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]

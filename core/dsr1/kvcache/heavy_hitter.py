"""Builtin KV cache ``heavy-hitter``: keep the recent tokens plus the tokens that received
the most attention so far, within a budget (H2O, Zhang et al. 2023; SnapKV is the
prompt-only variant) - the seed's "key-frame extraction".

``observe`` recomputes each layer's softmax attention weights (chunked over queries) and
adds them, summed over the queries and over *all heads of the layer*, to each kept token's
score: one selection per layer and sequence, shared by its heads (H2O selects per head;
sharing keeps one gather per layer and the K/V tensors rectangular). After each forward a
row keeps its last ``recent`` tokens and, in the rest of the budget, the real tokens with
the largest accumulated score (ties: the more recent). A prefill attends all of itself and
is cut afterwards, using the prompt's own attention as the first scores.

``budget`` is a fraction of the tokens a sequence has written so far (a float in (0, 1]:
``0.33`` keeps a third of any context; left padding is not counted) or a fixed number of
tokens (an int). Scores are summed in the same order whatever the batch (queries in chunks
sized by one row), so a row's selection does not depend on its neighbours. Positions are kept
as written (keys are cached after RoPE); see :mod:`dsr1.kvcache.evicting`.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsr1.hookspecs import hookimpl
from dsr1.kvcache.evicting import PADDING, PROTECTED, EvictingKVCache
from dsr1.specs import PluginSpec

#: bytes of attention weights one chunk of queries may make in ``observe``.
CHUNK_BYTES = 64 << 20


class HeavyHitterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: tokens kept: a fraction in (0, 1] of those written (float) or a count (int >= 1).
    budget: int | float = 0.33
    #: most recent tokens always kept (inside the budget).
    recent: int = Field(default=32, ge=0)

    @field_validator("budget")
    @classmethod
    def _in_range(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("budget must be a fraction in (0, 1] (a float) or a number of tokens (an int >= 1)")
        if isinstance(value, int) and value < 1:
            raise ValueError("budget must be a number of tokens >= 1 (an int) or a fraction in (0, 1] (a float)")
        return value


class HeavyHitterKVCache(EvictingKVCache):
    """Recent window + heavy hitters by accumulated attention, per layer and sequence."""

    Options = HeavyHitterOptions
    options: HeavyHitterOptions
    observes_queries = True

    def budget(self, written: int) -> int:
        b = self.options.budget
        return max(math.ceil(b * written), 1) if isinstance(b, float) else b

    def row_budgets(self, written: torch.Tensor) -> torch.Tensor:
        b = self.options.budget
        if isinstance(b, float):  # the same float64 product and ceiling as budget()
            return (written.double() * b).ceil().long().clamp_min(1)
        return torch.full_like(written, b)

    def priority(self, pos: torch.Tensor, valid: torch.Tensor, score: torch.Tensor, end: int) -> torch.Tensor:
        recent = pos >= end - self.options.recent  # (B, S)
        prio = torch.where(recent, PROTECTED + pos.double(), score.double())
        return torch.where(valid, prio, PADDING + pos.double())

    def observe(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> None:
        p = self._pending
        if p is None or p.layer != layer:
            return
        b, h, t, d = query.shape
        hkv, s = key.shape[1], key.shape[2]
        g = h // hkv
        q = query.float().reshape(b, hkv, g, t, d)  # (B, Hkv, G, T, D)
        kt = key.float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, S)
        acc = torch.zeros((b, s), dtype=torch.float32, device=query.device)
        # query chunks sized for one row, so each row's sums run in the same order at any batch size;
        # rows in blocks that keep one chunk of weights within CHUNK_BYTES
        step = max(CHUNK_BYTES // max(h * s * 4, 1), 1)
        rows = max(CHUNK_BYTES // max(step * h * s * 4, 1), 1)
        for r in range(0, b, rows):
            e = min(r + rows, b)
            for i in range(0, t, step):
                j = min(i + step, t)
                w = (q[r:e, :, :, i:j] @ kt[r:e]) * scale  # (Br, Hkv, G, tc, S)
                if mask is not None:
                    allowed = mask.expand(b, -1, -1, -1)[r:e, :, None, i:j]  # (Br, 1, 1, tc, S)
                else:  # causal, queries aligned to the last T keys
                    qi = torch.arange(i, j, device=query.device)[:, None] + (s - t)  # (tc, 1)
                    allowed = torch.arange(s, device=query.device)[None, :] <= qi  # (tc, S)
                w = w.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
                acc[r:e] += w.sum(dim=(1, 2, 3))  # (Br, S)
        p.score[:, p.score.shape[1] - s :] += acc  # the model may have cut the keys to its own window
        self._commit()


@hookimpl
def dsr1_kvcache() -> PluginSpec:
    return PluginSpec(
        name="heavy-hitter",
        family="kvcache",
        impl=HeavyHitterKVCache,
        options=HeavyHitterOptions,
        capabilities=frozenset({"kv", "compresses", "observes-queries", "policy:heavy-hitter"}),
        description="recent window + tokens with the largest accumulated attention within a budget (H2O)",
    )

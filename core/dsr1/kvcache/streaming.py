"""Builtin KV cache ``streaming``: attention sinks plus a recent window (StreamingLLM,
Xiao et al. 2023).

After each forward a row keeps its first ``sinks`` real tokens (padding is never a sink)
and its last ``window`` tokens; a decode step's query also sees its own new token, so it
attends ``sinks + window + 1`` keys. A prefill attends all of itself and is cut to the
budget afterwards. With ``sinks: 0`` this is the ring buffer of the last ``window`` tokens
that a sliding-window model (Mistral) needs: set ``window`` to the model's
``sliding_window``.

Positions are kept as written (keys are cached after RoPE), unlike StreamingLLM's in-cache
positions; see :mod:`dsr1.kvcache.evicting`.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsr1.hookspecs import hookimpl
from dsr1.kvcache.evicting import PADDING, PROTECTED, EvictingKVCache
from dsr1.specs import PluginSpec


class StreamingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: first real tokens always kept (attention sinks); 0 for a plain sliding window.
    sinks: int = Field(default=4, ge=0)
    #: most recent tokens kept.
    window: int = Field(default=252, gt=0)


class StreamingKVCache(EvictingKVCache):
    """Attention sinks + a window of recent tokens; everything between is evicted."""

    Options = StreamingOptions
    options: StreamingOptions

    def budget(self, written: int) -> int:
        return self.options.sinks + self.options.window

    def row_budgets(self, written: torch.Tensor) -> torch.Tensor:
        return torch.full_like(written, self.options.sinks + self.options.window)

    def priority(self, pos: torch.Tensor, valid: torch.Tensor, score: torch.Tensor, end: int) -> torch.Tensor:
        rank = valid.long().cumsum(dim=1)  # (B, S) slots are sorted by position
        sink = valid & (rank <= self.options.sinks)
        prio = pos.double() + sink.double() * PROTECTED  # sinks, then the most recent
        return torch.where(valid, prio, PADDING + pos.double())


@hookimpl
def dsr1_kvcache() -> PluginSpec:
    return PluginSpec(
        name="streaming",
        family="kvcache",
        impl=StreamingKVCache,
        options=StreamingOptions,
        capabilities=frozenset({"kv", "compresses", "policy:streaming"}),
        description="attention sinks + recent window (StreamingLLM); sinks=0 is a sliding-window ring buffer",
    )

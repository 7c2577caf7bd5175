"""``sliding``: softmax attention over a local window of keys (Mistral's sliding window).

With the ``T`` queries aligned to the last ``T`` of ``S`` keys, query ``i`` sits at key
position ``p = i + S - T`` and sees key ``j`` iff ``p - window < j <= p``, and-ed with any
boolean mask it is given (padding). This is transformers' Mistral semantics, which
dsr1's own masks (:func:`dsr1.models.common.build_mask`) follow too.

The window comes from the ``window`` option, or, when that is unset, from the checkpoint's
``sliding_window`` (:meth:`SlidingAttention.configure`); with neither it is a one-line error.

Computation: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask,
query block by query block (``block`` queries at a time): a block only reads the keys its
window reaches, so a prefill costs ``O(T · (block + window))`` time and memory instead of
``O(T · S)``. Decode (``T == 1``) is one call on the last ``window`` keys.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from dsr1_sdk import AttentionMechanism, Dsr1Error, Field, PluginOptions, PluginSpec, hookimpl

__all__ = ["SlidingAttention", "SlidingOptions", "dsr1_attention"]

#: ``enable_gqa`` appeared in torch 2.5 (``torch.__version__`` compares as a version).
HAS_ENABLE_GQA = torch.__version__ >= "2.5"


class SlidingOptions(PluginOptions):
    """Options of the ``sliding`` plugin."""

    window: int | None = Field(
        None, gt=0, description="keys each query sees, itself included (default: the checkpoint's sliding_window)"
    )
    block: int = Field(1024, ge=1, description="queries per SDPA call in a prefill (memory O(block·(block+window)))")


class SlidingAttention(AttentionMechanism):
    """Sliding-window softmax attention over SDPA; see the module docstring."""

    Options = SlidingOptions
    options: SlidingOptions

    def __init__(self, options: SlidingOptions | None = None) -> None:
        super().__init__(options)
        self.window: int | None = self.options.window

    def configure(self, hf_config: Mapping[str, Any]) -> None:
        """Take the window from the checkpoint's ``sliding_window`` when the option leaves it unset."""
        trained = hf_config.get("sliding_window")
        if self.options.window is None:
            if trained is None:
                raise Dsr1Error(
                    "attention 'sliding' needs a window: set attention.options.window (e.g. 4096); "
                    "this checkpoint's config.json has no sliding_window"
                )
            self.window = int(trained)
            if self.window <= 0:
                raise Dsr1Error(f"config.json: sliding_window must be > 0, got {trained}")
        elif trained is not None and int(trained) != self.options.window:
            warnings.warn(
                f"attention 'sliding' with window {self.options.window} on a checkpoint trained with sliding_window "
                f"{trained}: outputs will differ from the trained model's",
                UserWarning,
                stacklevel=2,
            )

    def _window(self) -> int:
        if self.window is None:
            raise Dsr1Error("attention 'sliding' has no window: set attention.options.window (a positive integer)")
        return self.window

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        w = self._window()
        b, h, t, d = query.shape  # (B, H, T, D)
        hkv, s = key.shape[1], key.shape[2]  # (B, Hkv, S, D)
        extra: dict[str, Any] = {}
        if h != hkv:
            if HAS_ENABLE_GQA:
                extra["enable_gqa"] = True
            else:
                key = key.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
                value = value.repeat_interleave(h // hkv, dim=1)
        if mask is not None:
            mask = mask.to(torch.bool).expand(b, 1, t, s)  # (B, 1, T, S) view
        offset = s - t  # key position of query 0
        block = self.options.block
        if t <= block:
            return self._attend(query, key, value, mask, scale, offset, w, extra)
        out = torch.empty_like(query)  # (B, H, T, D)
        for q0 in range(0, t, block):
            q1 = min(q0 + block, t)
            k0 = max(0, offset + q0 - w + 1)  # first key the block's first query sees
            k1 = offset + q1  # one past the last query's own key
            sub_mask = mask[:, :, q0:q1, k0:k1] if mask is not None else None  # (B, 1, q1-q0, k1-k0)
            out[:, :, q0:q1] = self._attend(
                query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], sub_mask, scale, offset + q0 - k0, w, extra
            )
        return out

    @staticmethod
    def _attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
        offset: int, w: int, extra: dict[str, Any],
    ) -> torch.Tensor:
        """``q`` ``(B, H, T, D)`` at key positions ``offset + i`` against ``k``/``v`` ``(B, Hkv, S, D)``."""
        t, s = q.shape[2], k.shape[2]
        p = torch.arange(t, device=q.device).unsqueeze(1) + offset  # (T, 1) key position of each query
        j = torch.arange(s, device=q.device).unsqueeze(0)  # (1, S)
        allowed = (j <= p) & (j > p - w)  # (T, S) causal window
        attn_mask = allowed if mask is None else mask & allowed  # (T, S) or (B, 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, **extra)  # (B, H, T, D)


@hookimpl
def dsr1_attention() -> PluginSpec:
    return PluginSpec(
        name="sliding",
        family="attention",
        impl=SlidingAttention,
        options=SlidingOptions,
        capabilities=frozenset({"gqa", "mask", "fp16", "bf16"}),
        description="sliding-window softmax attention (Mistral semantics) over torch SDPA, blocked prefill",
    )

"""``eager``: softmax attention written out in torch, the readable baseline.

``softmax(q kᵀ · scale + mask) v`` with grouped-query attention by repeating key/value
heads, boolean masks, and both products and the softmax computed in float32 whatever
the input dtype (fp32, fp16, bf16); the result is cast back to the query dtype. It
materializes the ``(B, H, T, S)`` score matrix, so its memory grows with ``T · S``: use
it as a reference and for debugging, and ``sdpa`` for speed.
"""
from __future__ import annotations

import torch

from dsr1_sdk import AttentionMechanism, PluginSpec, hookimpl

__all__ = ["EagerAttention", "dsr1_attention"]


class EagerAttention(AttentionMechanism):
    """Plain softmax attention; see the module docstring."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        b, h, t, d = query.shape  # (B, H, T, D)
        hkv, s = key.shape[1], key.shape[2]  # (B, Hkv, S, D)
        if h != hkv:
            key = key.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
            value = value.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
        scale = d**-0.5 if scale is None else scale
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, H, T, S) fp32
        if mask is None:
            if t > 1:  # queries aligned to the last T keys; a single query sees every key
                causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)  # (T, S)
                scores = scores.masked_fill(~causal, float("-inf"))
        else:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, T, S) broadcasts over H
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key → 0
        return torch.matmul(probs, value.float()).to(query.dtype)  # (B, H, T, D)


@hookimpl
def dsr1_attention() -> PluginSpec:
    return PluginSpec(
        name="eager",
        family="attention",
        impl=EagerAttention,
        capabilities=frozenset({"gqa", "mask", "fp16", "bf16"}),
        description="reference softmax attention in plain torch (GQA, boolean masks, fp32 softmax)",
    )

"""Reference softmax attention: ``softmax(q kᵀ · scale + mask) v``, written out in float64.

Semantics (those of :class:`dsr1.interfaces.AttentionMechanism`):

* ``query`` ``(B, H, T, D)``, ``key``/``value`` ``(B, Hkv, S, D)``, ``H % Hkv == 0``;
  query head ``h`` reads key/value head ``h // (H // Hkv)`` (grouped-query attention).
* ``mask is None``: causal, with the ``T`` queries aligned to the *last* ``T`` keys, so
  query ``i`` sees keys ``j <= i + (S - T)`` (prefill when ``T == S``, decode when ``T == 1``).
* ``mask`` boolean, broadcastable to ``(B, 1, T, S)``: ``True`` where a query may attend.
  A query row with no visible key has no defined output (the engine never reads it);
  this reference returns zeros there.
* ``scale`` defaults to ``D ** -0.5``.
"""
from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each key/value head ``n_rep`` times: ``(B, Hkv, S, D)`` → ``(B, Hkv*n_rep, S, D)``."""
    return x.repeat_interleave(n_rep, dim=1)


def causal_mask(t: int, s: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(T, S)`` boolean mask with the queries aligned to the last ``T`` keys."""
    if t > s:
        raise ValueError(f"causal attention needs at least as many keys as queries (T={t}, S={s})")
    i = torch.arange(t, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return j <= i + (s - t)  # (T, S)


def sliding_window_mask(t: int, s: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(T, S)`` causal mask restricted to a window (Mistral): with the queries aligned to the last
    ``T`` keys, query ``i`` (at key position ``p = i + S - T``) sees keys ``p - window < j <= p``."""
    p = torch.arange(t, device=device).unsqueeze(1) + (s - t)  # (T, 1) key position of each query
    j = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return (j <= p) & (j > p - window)  # (T, S)


def softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference attention. Computes in float64; returns ``out_dtype`` (default float64).

    :returns: ``(B, H, T, D)``.
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    q = query.to(torch.float64)  # (B, H, T, D)
    k = repeat_kv(key.to(torch.float64), h // hkv)  # (B, H, S, D)
    v = repeat_kv(value.to(torch.float64), h // hkv)  # (B, H, S, D)
    scale = d**-0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    if mask is None:
        allowed = causal_mask(t, s, query.device).expand(b, 1, t, s)  # (B, 1, T, S)
    else:
        allowed = mask.to(torch.bool).expand(b, 1, t, s)  # (B, 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S); NaN on rows with no visible key
    probs = torch.nan_to_num(probs, nan=0.0)
    out = probs @ v  # (B, H, T, D)
    return out.to(out_dtype) if out_dtype is not None else out


def attended_rows(mask: torch.Tensor | None, b: int, t: int, s: int) -> torch.Tensor:
    """``(B, 1, T, 1)`` boolean: the query rows that see at least one key (defined output)."""
    if mask is None:
        return torch.ones(b, 1, t, 1, dtype=torch.bool)
    return mask.to(torch.bool).expand(b, 1, t, s).any(dim=-1, keepdim=True)

"""Reference causal linear attention (Katharopoulos et al. 2020), written out in float64.

The quadratic masked form, obviously equal to the definition::

    out_i = Σ_j m_ij (φ(q_i)·φ(k_j)) v_j / max(Σ_j m_ij φ(q_i)·φ(k_j), eps)

* ``query`` ``(B, H, T, D)``, ``key``/``value`` ``(B, Hkv, S, D)``; query head ``h`` reads
  key/value head ``h // (H // Hkv)``.
* ``mask is None``: causal with the ``T`` queries aligned to the last ``T`` keys. A boolean
  ``mask`` broadcastable to ``(B, 1, T, S)`` gives ``m_ij`` directly (a plugin built on running
  sums supports only causal ∧ key-padding masks; the reference takes any).
* ``scale`` is accepted and ignored: the normalisation replaces the softmax temperature.
* A row whose weights sum to less than ``eps`` (no visible key, or ``relu`` zeroing them all)
  returns ``Σ weights·v / eps``, i.e. zeros when it sees no key.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsr1_sdk.reference.attention import causal_mask, repeat_kv

#: feature maps by the names the ``linear`` plugin uses.
FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    feature_map: str = "elu+1",
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference causal linear attention. Computes in float64; returns ``out_dtype`` (default float64).

    :returns: ``(B, H, T, D)``.
    """
    b, h, t, _ = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    phi = FEATURE_MAPS[feature_map]
    q = phi(query.to(torch.float64))  # (B, H, T, D)
    k = phi(repeat_kv(key.to(torch.float64), h // hkv))  # (B, H, S, D)
    v = repeat_kv(value.to(torch.float64), h // hkv)  # (B, H, S, D)
    if mask is None:
        allowed = causal_mask(t, s, query.device).expand(b, 1, t, s)  # (B, 1, T, S)
    else:
        allowed = mask.to(torch.bool).expand(b, 1, t, s)  # (B, 1, T, S)
    weights = (q @ k.transpose(-1, -2)) * allowed  # (B, H, T, S), m_ij φ(q_i)·φ(k_j)
    den = weights.sum(-1, keepdim=True).clamp_min(eps)  # (B, H, T, 1)
    out = (weights @ v) / den  # (B, H, T, D)
    return out.to(out_dtype) if out_dtype is not None else out


def padding_mask_of(mask: torch.Tensor | None, b: int, t: int, s: int) -> torch.Tensor | None:
    """The causal ∧ key-padding mask a running-sum plugin actually applies for ``mask``:
    keys valid per the mask's last query row, causal alignment to the last ``T`` keys."""
    if mask is None:
        return None
    valid = mask.to(torch.bool).expand(b, 1, t, s)[:, 0, -1]  # (B, S)
    return causal_mask(t, s, mask.device)[None, None] & valid[:, None, None, :]  # (B, 1, T, S)

"""``linear``: causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax ``exp(q·k)`` is replaced by a kernel ``φ(q)·φ(k)`` with a positive feature map
``φ`` (``elu(x) + 1`` by default, ``relu`` as an option), so causal attention becomes

    out_i = φ(q_i)ᵀ S_i / max(φ(q_i)ᵀ z_i, eps)
    S_i = Σ_{j≤i} φ(k_j) v_jᵀ  (D, D)        z_i = Σ_{j≤i} φ(k_j)  (D,)

Two forms of the same sum:

* ``forward`` (no cache, prefill): the chunked parallel form. Keys are taken ``chunk`` at a
  time: inside a chunk the ``(C, C)`` causal kernel matrix is used, earlier chunks enter
  through the running ``S``/``z``. Memory is the output plus ``O(C² + D²)`` per head: linear
  in the sequence length; the ``(T, S)`` matrix is never built.
* ``forward_recurrent`` (decode with a cache): the same loop started from the ``S``/``z``
  the cache keeps per layer (``(B, Hkv, D, D)`` and ``(B, Hkv, D)``, fp32, fixed size), and
  folded forward in place.

Semantics and limits:

* ``scale`` is not used: the normalisation by ``φ(q)·z`` takes the place of the softmax
  temperature (the exact reference, :func:`dsr1_sdk.reference.linear_attention`, agrees).
* Masks: causal plus key padding only. Key validity is read from the mask's last query row
  (``mask[:, 0, -1, :]``, the row that sees every real key under a causal padding mask), and
  padded keys get ``φ(k) = 0``: they add nothing to ``S`` or ``z``. Arbitrary masks
  (sliding windows, bidirectional) cannot be expressed by running sums and are not honoured.
* Sums and products are fp32 whatever the input dtype (fp32, fp16, bf16); the output is
  cast back to the query dtype.
* Grouped-query attention natively: query heads of one group share their key/value head's
  ``S`` and ``z`` (the state is per key/value head).
* Fidelity: a checkpoint trained with softmax attention computes something else under
  linear attention. :meth:`LinearAttention.configure` warns unless its ``config.json`` says
  ``"dsr1_attention": "linear"``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dsr1_sdk import AttentionMechanism, Field, PluginOptions, PluginSpec, hookimpl

__all__ = ["FEATURE_MAPS", "LinearAttention", "LinearOptions", "dsr1_attention", "linear_attention_chunked"]

FeatureMap = Literal["elu+1", "relu"]

#: name → φ. Both are non-negative, so every ``φ(q)·φ(k) >= 0`` and the denominator is a sum of weights.
FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


class LinearOptions(PluginOptions):
    """Options of the ``linear`` plugin."""

    feature_map: FeatureMap = Field("elu+1", description="positive feature map φ: elu+1 (Katharopoulos) or relu")
    chunk: int = Field(128, ge=1, description="keys per block of the parallel form (memory O(chunk²) per head)")
    eps: float = Field(1e-6, gt=0, description="floor of the denominator φ(q)·Σφ(k) (a row seeing no key gives 0)")


def linear_attention_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    key_valid: torch.Tensor | None,
    phi: Callable[[torch.Tensor], torch.Tensor],
    chunk: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention of ``query`` ``(B, H, T, D)`` over the same ``T`` positions of
    ``key``/``value`` ``(B, Hkv, T, D)``, after the history held in ``s`` ``(B, Hkv, D, D)`` and
    ``z`` ``(B, Hkv, D)`` (fp32). ``key_valid`` ``(B, T)`` zeroes φ of padded keys.

    Returns ``(out (B, H, T, D) in query's dtype, s', z')``; ``s``/``z`` are not modified (the
    function is differentiable: ``tools/train_tiny.py`` trains through it).
    """
    b, h, t, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    out = torch.empty(b, h, t, d, dtype=query.dtype, device=query.device)  # (B, H, T, D)
    out_g = out.unflatten(1, (hkv, g))  # (B, Hkv, G, T, D) view
    q_g = query.unflatten(1, (hkv, g))  # (B, Hkv, G, T, D) view
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).tril()  # (C, C)
    for c0 in range(0, t, chunk):
        c1 = min(c0 + chunk, t)
        c = c1 - c0
        qc = phi(q_g[..., c0:c1, :].float()).reshape(b, hkv, g * c, d)  # (B, Hkv, G·C, D)
        kc = phi(key[:, :, c0:c1].float())  # (B, Hkv, C, D)
        if key_valid is not None:
            kc = kc * key_valid[:, None, c0:c1, None]  # padded keys: φ(k) = 0
        vc = value[:, :, c0:c1].float()  # (B, Hkv, C, D)
        a = (qc @ kc.transpose(-1, -2)).view(b, hkv, g, c, c)  # (B, Hkv, G, C, C) intra-chunk kernel
        a = a.masked_fill(~tril[:c, :c], 0.0).view(b, hkv, g * c, c)  # causal inside the chunk
        num = qc @ s + a @ vc  # (B, Hkv, G·C, D): history + this chunk
        den = qc @ z.unsqueeze(-1) + a.sum(-1, keepdim=True)  # (B, Hkv, G·C, 1)
        out_g[..., c0:c1, :] = (num / den.clamp_min(eps)).view(b, hkv, g, c, d).to(query.dtype)
        s = s + kc.transpose(-1, -2) @ vc  # (B, Hkv, D, D)
        z = z + kc.sum(-2)  # (B, Hkv, D)
    return out, s, z


class LinearAttention(AttentionMechanism):
    """Causal linear attention; see the module docstring."""

    Options = LinearOptions
    options: LinearOptions

    def __init__(self, options: LinearOptions | None = None) -> None:
        super().__init__(options)
        self.phi = FEATURE_MAPS[self.options.feature_map]

    def configure(self, hf_config: Mapping[str, Any]) -> None:
        """Warn when the checkpoint was trained with another attention (its outputs will change)."""
        native = hf_config.get("dsr1_attention")
        if native == "linear":
            return
        trained = f"{native!r} attention" if native else "softmax attention"
        window = " (its sliding_window is ignored too)" if hf_config.get("sliding_window") else ""
        warnings.warn(
            f"attention 'linear' on a checkpoint trained with {trained}{window}: its outputs will change, "
            "often to noise; use a model trained with linear attention (config.json \"dsr1_attention\": "
            "\"linear\", e.g. dsr1-tiny-linear) or a softmax attention plugin",
            UserWarning,
            stacklevel=2,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        b, _, t, d = query.shape  # (B, H, T, D)
        hkv, s_len = key.shape[1], key.shape[2]  # (B, Hkv, S, D)
        valid = None
        if mask is not None:
            valid = mask.to(torch.bool).expand(b, 1, t, s_len)[:, 0, -1]  # (B, S) the last row sees every real key
        s = torch.zeros(b, hkv, d, d, dtype=torch.float32, device=query.device)  # (B, Hkv, D, D)
        z = torch.zeros(b, hkv, d, dtype=torch.float32, device=query.device)  # (B, Hkv, D)
        p = s_len - t  # keys before the first query (chunked prefill, decode without a cache)
        if p > 0:
            s, z = self._absorb(key[:, :, :p], value[:, :, :p], None if valid is None else valid[:, :p], s, z)
        out, _, _ = linear_attention_chunked(
            query, key[:, :, p:], value[:, :, p:], s, z, None if valid is None else valid[:, p:],
            self.phi, self.options.chunk, self.options.eps,
        )
        return out

    def _absorb(
        self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold keys/values ``(B, Hkv, P, D)`` that no query sits on into ``s``/``z``, a chunk at a time."""
        chunk = self.options.chunk
        for c0 in range(0, key.shape[2], chunk):
            kc = self.phi(key[:, :, c0 : c0 + chunk].float())  # (B, Hkv, C, D)
            if valid is not None:
                kc = kc * valid[:, None, c0 : c0 + chunk, None]
            s = s + kc.transpose(-1, -2) @ value[:, :, c0 : c0 + chunk].float()  # (B, Hkv, D, D)
            z = z + kc.sum(-2)  # (B, Hkv, D)
        return s, z

    # --- recurrent decoding -------------------------------------------------------------------

    def state_shapes(self, batch: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"s": (batch, kv_heads, head_dim, head_dim), "z": (batch, kv_heads, head_dim)}

    def forward_recurrent(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        state: dict[str, torch.Tensor],
        key_valid: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        out, s, z = linear_attention_chunked(
            query, key, value, state["s"], state["z"], key_valid, self.phi, self.options.chunk, self.options.eps
        )
        state["s"].copy_(s)  # (B, Hkv, D, D)
        state["z"].copy_(z)  # (B, Hkv, D)
        return out


@hookimpl
def dsr1_attention() -> PluginSpec:
    return PluginSpec(
        name="linear",
        family="attention",
        impl=LinearAttention,
        options=LinearOptions,
        capabilities=frozenset({"gqa", "padding_mask", "recurrent", "fp16", "bf16"}),
        description="causal linear attention (Katharopoulos 2020): chunked prefill, fixed-size recurrent decode state",
    )

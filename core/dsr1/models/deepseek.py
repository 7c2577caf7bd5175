"""The ``deepseek`` architecture: DeepSeek-V2 / V2-Lite and DeepSeek-V3 / R1.

Data flows as in Llama (embed → N × [RMSNorm → attention → residual → RMSNorm → MLP →
residual] → RMSNorm → lm_head), with two differences:

* **multi-head latent attention (MLA)**: keys and values come from one compressed latent per
  token, ``c = RMSNorm(W_dkv x)`` of ``kv_lora_rank`` (``L``) dims, plus one rope key of
  ``qk_rope_head_dim`` (``R``) dims shared by every head. The cache stores only that
  ``L + R`` vector per token and layer (one "head"), never per-head keys and values.
  Two ways to attend over it:

  - the *reference* path (``fuse: false``) expands the cached latents into per-head keys and
    values with ``kv_b_proj`` at every step and calls the attention plugin, as transformers does;
  - the *absorbed* path (default) folds ``kv_b_proj``'s key half into the queries and its value
    half into the output: queries live in the latent space, attention is multi-query over the
    cached latents (values are the first ``L`` dims of the same vectors), and nothing per head is
    materialised per step. Same scores, same outputs, in a different order of operations.

* **mixture of experts** after the first ``first_k_dense_replace`` dense layers, with shared
  experts and DeepSeek's routings (:mod:`dsr1.models.moe`).

Rope acts on the last ``R`` dims of each query head and on the shared rope key. DeepSeek's
checkpoints lay those dims out as interleaved pairs; the builder permutes the rows of the
projections that produce them at load (pairs → halves), so the usual half-split rope applies
and scores are unchanged (``hf_state_dict`` permutes them back).
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionContext, CacheShape
from dsr1.models.common import (
    AttentionCall,
    CausalLM,
    GatedMLP,
    RMSNorm,
    bind_attention,
)
from dsr1.models.hf_fields import flag, integer, positive_number
from dsr1.models.loading import (
    CheckpointBuilder,
    LoadOptions,
    assign_weights_,
    build_state,
    check_names,
    choose_dtype,
)
from dsr1.models.moe import MoEArgs, SparseMoE, expert_sources, stack_experts, unstack_experts
from dsr1.models.rope import (
    RotaryEmbedding,
    apply_rope,
    apply_rope_fast,
    rope_inv_freq,
    rope_parameters,
    yarn_mscale,
)
from dsr1.parallel.topology import refuse_tensor_parallel
from dsr1.specs import PluginSpec

#: the router's score function each routing needs (``scoring_func`` of DeepSeek's configs).
SCORING = {"greedy": "softmax", "group_limited_greedy": "softmax", "noaux_tc": "sigmoid"}


@dataclass(frozen=True)
class DeepseekArgs:
    """The parts of a DeepSeek ``config.json`` this file uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    eps: float
    context_length: int
    rope: dict[str, Any]
    #: the checkpoint's rope dims are interleaved pairs (permuted to halves at load)
    rope_interleave: bool
    attention_bias: bool
    tie_embeddings: bool
    first_k_dense_replace: int
    n_shared_experts: int
    moe: MoEArgs | None

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> DeepseekArgs:
        mt = str(hf.get("model_type"))
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise Dsr1Error(f"config.json: hidden_act {act!r} is not supported by the deepseek builder (silu only)")
        n_layers = integer(hf, "num_hidden_layers")
        vocab, hidden = integer(hf, "vocab_size"), integer(hf, "hidden_size")
        intermediate = integer(hf, "intermediate_size")
        moe = None
        if hf.get("n_routed_experts"):
            routing = str(hf.get("topk_method") or ("noaux_tc" if mt == "deepseek_v3" else "greedy"))
            scoring = hf.get("scoring_func") or SCORING.get(routing)
            if routing in SCORING and scoring != SCORING[routing]:
                raise Dsr1Error(f"config.json: scoring_func {scoring!r} does not go with topk_method {routing!r}; "
                                f"supported pairs: " + ", ".join(f"{r}+{s}" for r, s in SCORING.items()))
            if integer(hf, "moe_layer_freq", 1) != 1:
                raise Dsr1Error(f"config.json: moe_layer_freq {hf['moe_layer_freq']} is not supported; "
                                "supported: 1 (every layer after first_k_dense_replace is MoE)")
            moe = MoEArgs.from_hf(dict(hf), routing, router_fp32=True)
        q_lora = integer(hf, "q_lora_rank", 0, minimum=0)  # 0 or null: no low-rank query (V2-Lite)
        return cls(
            model_type=mt,
            vocab_size=vocab,
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=integer(hf, "num_attention_heads"),
            q_lora_rank=q_lora or None,
            kv_lora_rank=integer(hf, "kv_lora_rank"),
            qk_nope_head_dim=integer(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=integer(hf, "qk_rope_head_dim"),
            v_head_dim=integer(hf, "v_head_dim"),
            intermediate_size=intermediate,
            eps=positive_number(hf, "rms_norm_eps", 1e-6),
            context_length=integer(hf, "max_position_embeddings", 2048),
            rope=rope_parameters(dict(hf)),
            rope_interleave=mt == "deepseek_v2" or flag(hf, "rope_interleave", True),
            attention_bias=flag(hf, "attention_bias", False),
            tie_embeddings=flag(hf, "tie_word_embeddings", False),
            first_k_dense_replace=integer(hf, "first_k_dense_replace", 0, minimum=0) if moe else n_layers,
            n_shared_experts=integer(hf, "n_shared_experts", 0, minimum=0),
            moe=moe,
        )

    # the cache holds one latent "head" per token: what the engine's pools and cache plugins size by
    @property
    def n_kv_heads(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    #: keys and values are the same cached vectors (values read their first ``kv_lora_rank`` dims).
    kv_shared = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.first_k_dense_replace

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the transformers checkpoint, with its shape."""
        c, h, r, dr = self.hidden_size, self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, c)}
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            out[p + "input_layernorm.weight"] = (c,)
            out[p + "post_attention_layernorm.weight"] = (c,)
            if self.q_lora_rank:
                out[a + "q_a_proj.weight"] = (self.q_lora_rank, c)
                if self.attention_bias:
                    out[a + "q_a_proj.bias"] = (self.q_lora_rank,)
                out[a + "q_a_layernorm.weight"] = (self.q_lora_rank,)
                out[a + "q_b_proj.weight"] = (h * self.qk_head_dim, self.q_lora_rank)
            else:
                out[a + "q_proj.weight"] = (h * self.qk_head_dim, c)
            out[a + "kv_a_proj_with_mqa.weight"] = (r + dr, c)
            if self.attention_bias:
                out[a + "kv_a_proj_with_mqa.bias"] = (r + dr,)
            out[a + "kv_a_layernorm.weight"] = (r,)
            out[a + "kv_b_proj.weight"] = (h * (self.qk_nope_head_dim + self.v_head_dim), r)
            out[a + "o_proj.weight"] = (c, h * self.v_head_dim)
            if self.attention_bias:
                out[a + "o_proj.bias"] = (c,)
            if self.is_moe(i):
                m = self.moe
                assert m is not None
                f = m.intermediate_size
                out[p + "mlp.gate.weight"] = (m.n_experts, c)
                if m.routing == "noaux_tc":
                    out[p + "mlp.gate.e_score_correction_bias"] = (m.n_experts,)
                for e in range(m.n_experts):
                    for name, shape in (("gate", (f, c)), ("up", (f, c)), ("down", (c, f))):
                        out[p + f"mlp.experts.{e}.{name}_proj.weight"] = shape
                fs = f * self.n_shared_experts
                if fs:
                    for name, shape in (("gate", (fs, c)), ("up", (fs, c)), ("down", (c, fs))):
                        out[p + f"mlp.shared_experts.{name}_proj.weight"] = shape
            else:
                f = self.intermediate_size
                for name, shape in (("gate", (f, c)), ("up", (f, c)), ("down", (c, f))):
                    out[p + f"mlp.{name}_proj.weight"] = shape
        out["model.norm.weight"] = (c,)
        if not self.tie_embeddings:
            out["lm_head.weight"] = (self.vocab_size, c)
        return out


# --- attention ---------------------------------------------------------------------------------


def latent_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None, rank: int,
) -> torch.Tensor:
    """Multi-query attention of absorbed queries ``(B, H, T, L+R)`` over cached latents ``k``
    ``(B, 1, S, L+R)``; values are the latents' first ``rank`` dims. Returns ``(B, H, T, L)``.
    ``mask`` as the attention plugins take it (``None``: causal, the queries being the last ``T``)."""
    b, h, t, d = q.shape
    s = k.shape[2]
    keys = k[:, 0]  # (B, S, L+R): one shared head, read once for every query head
    scores = torch.bmm(q.reshape(b, h * t, d), keys.transpose(1, 2)).view(b, h, t, s).float() * scale  # (B, H, T, S)
    if mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)  # (T, S) lower-right causal
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
    return torch.bmm(p.view(b, h * t, s), keys[..., :rank]).view(b, h, t, rank)  # (B, H, T, L)


class MLAttention(nn.Module):
    def __init__(self, a: DeepseekArgs, layer: int, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.layer, self.attn, self.fused = layer, attn, fused
        self.h, self.r, self.dr = a.n_heads, a.kv_lora_rank, a.qk_rope_head_dim
        self.dn, self.dv = a.qk_nope_head_dim, a.v_head_dim
        c, h = a.hidden_size, a.n_heads
        self.q_lora = a.q_lora_rank is not None
        if a.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(c, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)  # DeepSeek's latent norms keep the default eps
            self.q_b_proj = nn.Linear(a.q_lora_rank, h * a.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c, h * a.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c, self.r + self.dr, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r)
        self.kv_b_proj = nn.Linear(self.r, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, c, bias=a.attention_bias)
        self._dequantized: torch.Tensor | None = None
        scale = a.qk_head_dim**-0.5
        if a.rope["rope_type"] != "default" and a.rope.get("mscale_all_dim"):
            scale *= yarn_mscale(float(a.rope["factor"]), float(a.rope["mscale_all_dim"])) ** 2
        self.scale = scale

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        cache: Any, start: int | torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, r, dr, dn, dv = self.h, self.r, self.dr, self.dn, self.dv
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(b, t, h, dn + dr).split([dn, dr], dim=-1)  # (B, T, H, dn), (B, T, H, R)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # (B, T, L), (B, T, R)
        c = self.kv_a_layernorm(c)
        rope = apply_rope_fast if self.fused else apply_rope
        q_pe = rope(q_pe, cos, sin)  # (B, T, H, R)
        k_pe = rope(k_pe[:, :, None], cos, sin)  # (B, T, 1, R)
        latent = torch.cat([c, k_pe[:, :, 0]], dim=-1)[:, None]  # (B, 1, T, L+R): what the cache keeps
        if not self.fused:  # reference: per-head keys and values from the latents, the attention plugin
            query = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn+R)
            o = self._attend(query, latent, mask, cache, start, self._expanded)  # (B, H, T, dv)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, h * dv))  # (B, T, C)
        w = self._kv_b_weight(q.dtype).view(h, dn + dv, r)  # (H, dn+dv, L): per head, key rows then value rows
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w[:, :dn])  # (B, H, T, L): queries in latent space
        query = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # (B, H, T, L+R)
        o = self._attend(query, latent, mask, cache, start, self._absorbed)  # (B, H, T, L)
        o = torch.einsum("bhtr,hvr->bthv", o, w[:, dn:])  # (B, T, H, dv)
        return self.o_proj(o.reshape(b, t, h * dv))  # (B, T, C)

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_b_proj``'s weight ``(H·(dn+dv), L)``: the absorbed path multiplies by slices of it rather than
        calling the layer, so a quantized one serves through its dequantized weight, made once."""
        if isinstance(self.kv_b_proj, nn.Linear):
            return self.kv_b_proj.weight
        if self._dequantized is None:
            self._dequantized = self.kv_b_proj.dequantize().to(dtype)
        return self._dequantized

    def _attend(
        self, query: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, cache: Any,
        start: int | torch.Tensor, fn: Any,
    ) -> torch.Tensor:
        """Store this step's latents in ``cache`` and attend ``query`` over the cached ones with ``fn``."""
        if isinstance(cache, AttentionContext):  # the engine's paged pool (keys and values: the same latents)
            return cache.attend(self.layer, query, latent, latent, fn, self.scale, False)
        if isinstance(start, torch.Tensor):  # static decode (CUDA graphs): whole buffers, mask covers them
            keys, _ = cache.update_static(self.layer, latent, latent, start)  # (B, 1, Tcap, L+R)
            return fn(query, keys, keys, mask, self.scale)
        keys = latent
        if cache is not None:
            keys, _ = cache.update(self.layer, latent, latent, start)  # (B, 1, S, L+R)
            if mask is not None and cache.compresses:
                mask = cache.select_mask(self.layer, mask)
        o = fn(query, keys, keys, mask, self.scale)
        if cache is not None and cache.observes_queries:
            cache.observe(self.layer, query, keys, mask, self.scale)
        return o

    def _absorbed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float | None) -> torch.Tensor:
        return latent_attention(q, k, v, mask, scale, self.r)

    def _expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float | None) -> torch.Tensor:
        """Keys/values of every head from the cached latents ``k`` ``(B, 1, S, L+R)``, then the plugin."""
        b, _, s, _ = k.shape
        c, k_pe = k[:, 0].split([self.r, self.dr], dim=-1)  # (B, S, L), (B, S, R)
        kv = self.kv_b_proj(c).view(b, s, self.h, self.dn + self.dv).transpose(1, 2)  # (B, H, S, dn+dv)
        k_nope, values = kv.split([self.dn, self.dv], dim=-1)
        keys = torch.cat([k_nope, k_pe[:, None].expand(b, self.h, s, self.dr)], dim=-1)  # (B, H, S, dn+R)
        return self.attn(q, keys, values, mask, scale)  # (B, H, T, dv)


class DeepseekBlock(nn.Module):
    def __init__(self, a: DeepseekArgs, layer: int, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.eps)
        self.self_attn = MLAttention(a, layer, attn, fused)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.eps)
        if a.is_moe(layer):
            assert a.moe is not None
            fs = a.moe.intermediate_size * a.n_shared_experts
            shared = GatedMLP(a.hidden_size, fs, False, fused) if fs else None
            self.mlp: nn.Module = SparseMoE(a.moe, grouped=fused, shared=shared)
        else:
            self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, False, fused)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        masks: tuple[torch.Tensor | None, torch.Tensor | None], cache: Any, start: int | torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks[0], cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekBackbone(nn.Module):
    def __init__(self, a: DeepseekArgs, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DeepseekBlock(a, i, attn, fused) for i in range(a.n_layers))
        self.norm = RMSNorm(a.hidden_size, a.eps)


class DeepseekForCausalLM(CausalLM):
    def __init__(self, a: DeepseekArgs, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.args, self.fused = a, fused
        self.model = DeepseekBackbone(a, attn, fused)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        inv_freq, scaling = rope_inv_freq(a.rope, a.qk_rope_head_dim, a.context_length)
        self.rope = RotaryEmbedding(inv_freq, scaling)
        self.context_length = a.context_length

    def cache_shape(self, batch_size: int, max_len: int) -> CacheShape:
        a = self.args
        return CacheShape(a.n_layers, batch_size, max_len, a.n_kv_heads, a.head_dim)

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        a = self.args
        for name, t in self.state_dict().items():
            if a.tie_embeddings and name == "lm_head.weight":
                continue
            if ".experts." in name and not re.search(r"experts\.\d", name):  # stacked experts
                yield from unstack_experts(name, t)
            elif ".gate_up_proj." in name:  # the weight, or a quantized layer's qweight/scales (rows split too)
                halves = t.chunk(2, dim=0) if t.dim() and t.shape[0] % 2 == 0 else (t, t)
                yield name.replace("gate_up_proj", "gate_proj"), halves[0]
                yield name.replace("gate_up_proj", "up_proj"), halves[1]
            else:
                yield name, _permute_rope_rows(a, name, t, inverse=True)


# --- building -----------------------------------------------------------------------------------

_GATE_UP = re.compile(r"^(.+)\.gate_up_proj\.weight$")
#: fused module → the checkpoint modules it concatenates (what quant checkpoints and the fp8 plugin read).
FUSED: dict[str, tuple[str, ...]] = {
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "shared_experts.gate_up_proj": ("shared_experts.gate_proj", "shared_experts.up_proj"),
}


def _rope_perm(dr: int) -> torch.Tensor:
    """Interleaved pairs ``(x0, x1), (x2, x3)…`` → halves ``(x0, x2…, x1, x3…)``."""
    return torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])


def _permute_rope_rows(a: DeepseekArgs, name: str, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The rows of ``name`` that produce rope dims, permuted pairs → halves (``inverse``: back)."""
    if not a.rope_interleave:
        return t
    perm = _rope_perm(a.qk_rope_head_dim)
    if inverse:
        perm = perm.argsort()
    perm = perm.to(t.device)
    if name.endswith(("q_proj.weight", "q_b_proj.weight")):
        w = t.view(a.n_heads, a.qk_head_dim, -1)  # (H, dn+R, in)
        rope = w[:, a.qk_nope_head_dim :].index_select(1, perm)  # (H, R, in)
        return torch.cat([w[:, : a.qk_nope_head_dim], rope], dim=1).view_as(t)
    if name.endswith(("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")):
        return torch.cat([t[: a.kv_lora_rank], t[a.kv_lora_rank :].index_select(0, perm)], dim=0)
    return t


class DeepseekOptions(LoadOptions):
    #: the absorbed MLA path, gate/up fused into one matmul and grouped-GEMM experts (``false``: the
    #: reference path, module for module as transformers).
    fuse: bool = True


def build_deepseek(hf: Mapping[str, Any], reader: Any, pipeline: Any, options: DeepseekOptions) -> DeepseekForCausalLM:
    """Build on the meta device, then assign the checkpoint's tensors (no second copy)."""
    refuse_tensor_parallel(pipeline, str(hf.get("model_type")))
    a = DeepseekArgs.from_hf(hf)
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")

    def ignorable(n: str) -> bool:  # V3's multi-token-prediction layers sit after the last layer
        m = layer_re.match(n)
        return n.endswith("rotary_emb.inv_freq") or (a.tie_embeddings and n == "lm_head.weight") or (
            m is not None and int(m.group(1)) >= a.n_layers)

    names = check_names(reader, a.hf_tensor_shapes(), ignorable=ignorable)
    dtype = choose_dtype(options, pipeline, reader)
    state = build_state(pipeline)  # before weight_device: the pool may plan from the checkpoint first
    device = pipeline.pool.weight_device(pipeline.device)
    attn = bind_attention(pipeline, a.n_heads, a.n_heads, hf)
    if attn.recurrent:
        raise Dsr1Error(f"attention plugin {attn.name} decodes from a fixed-size state, which multi-head latent "
                        "attention has no place for; pick a softmax attention plugin (e.g. sdpa) for DeepSeek models")
    with torch.device("meta"):
        model = DeepseekForCausalLM(a, attn, options.fuse)
    with pipeline.device.relayout_memory():
        for name in model.state_dict():
            if a.tie_embeddings and name == "lm_head.weight":
                continue
            # DeepSeek keeps the router in fp32 (its scores pick experts: rounding would change the choice)
            want = torch.float32 if ".mlp.gate." in name else dtype
            stacked = {}
            if a.moe is not None and "experts." in name:
                stacked = expert_sources(name.rsplit("experts.", 1)[0], a.moe.n_experts)
            if name in stacked:
                sources, how = stacked[name]
                state[name] = stack_experts([reader.read(names[s], want, device) for s in sources], how)
            elif (m := _GATE_UP.match(name)) is not None:
                parts = [reader.read(names[f"{m.group(1)}.{p}_proj.weight"], want, device) for p in ("gate", "up")]
                state[name] = torch.cat(parts, dim=0)  # (2F, C)
            else:
                state[name] = _permute_rope_rows(a, name, reader.read(names[name], want, device))
    assign_weights_(model, state, a.tie_embeddings, device, hf)
    return model


class DeepseekBuilder(CheckpointBuilder):
    """DeepSeek-V2 / V3 / R1 checkpoints → :class:`DeepseekForCausalLM`."""

    Options = DeepseekOptions
    options: DeepseekOptions

    def build_model(self, hf_config: Mapping[str, Any], reader: Any, pipeline: Any) -> DeepseekForCausalLM:
        return build_deepseek(hf_config, reader, pipeline, self.options)


@hookimpl
def dsr1_model() -> PluginSpec:
    return PluginSpec(
        name="deepseek",
        family="model",
        impl=DeepseekBuilder,
        options=DeepseekOptions,
        capabilities=frozenset({"model_type:deepseek_v2", "model_type:deepseek_v3"}),
        description="DeepSeek-V2/V3/R1: multi-head latent attention on a latent KV cache, MoE with shared experts",
    )

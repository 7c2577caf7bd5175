"""The ``llama`` architecture: Llama 2/3 (llama3 rope scaling), Mistral (sliding window),
Qwen2 (qkv bias, tied or untied embeddings), Qwen3 (a per-head RMSNorm on q and k before rope),
Qwen3-MoE (Qwen3 with mixture-of-experts MLPs, :mod:`dsr1.models.moe`).
DeepSeek-R1-Distill-{Qwen,Llama} use these.

Data flows: token ids → embed → N × [RMSNorm → attention (+ rope, KV cache, plugin) →
residual → RMSNorm → SwiGLU MLP → residual] → RMSNorm → lm_head → logits.

At load, q/k/v and gate/up projections are fused into one matmul each (``fuse`` option);
``hf_state_dict`` splits them again so saved checkpoints are plain transformers format.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dsr1.errors import Dsr1Error, quote
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionContext, CacheShape, KVCache
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
from dsr1.models.packing import pack_for_device_, pack_linears_, unpack_linears_
from dsr1.models.rope import RotaryEmbedding, apply_rope, apply_rope_fast, rope_inv_freq, rope_parameters
from dsr1.parallel.pipeline import PipelineStage, check_pipeline, join_stages, stage_names
from dsr1.parallel.tensor import ParallelLMHead, TensorPlan
from dsr1.parallel.topology import check_tensor, stage_tensor_group
from dsr1.specs import PluginSpec


@dataclass(frozen=True)
class LlamaArgs:
    """The parts of a ``config.json`` this file uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    context_length: int
    rope: dict[str, Any]
    qkv_bias: bool
    #: Qwen3: an RMSNorm over each head's query and key (before rope)
    qk_norm: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    windows: tuple[int | None, ...]
    #: Qwen3-MoE: the experts of the sparse layers (None: every layer dense)
    moe: MoEArgs | None = None
    #: layers that keep a dense MLP although the model has experts
    dense_layers: frozenset[int] = frozenset()

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaArgs:
        mt = str(hf.get("model_type"))
        hidden, heads = integer(hf, "hidden_size"), integer(hf, "num_attention_heads")
        n_layers = integer(hf, "num_hidden_layers")
        kv = integer(hf, "num_key_value_heads", heads)
        if heads % kv:
            raise Dsr1Error(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise Dsr1Error(f"config.json: hidden_act {act!r} is not supported by the llama builder (silu only)")
        window = integer(hf, "sliding_window", None)
        if mt in ("qwen2", "qwen3", "qwen3_moe") and not flag(hf, "use_sliding_window", False):
            window = None
        layer_types = hf.get("layer_types")
        if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers):
            raise Dsr1Error(f"config.json layer_types must be a list of {n_layers} entries (one per layer, "
                            f"num_hidden_layers), got {quote(layer_types)}")
        if window is None:
            windows: tuple[int | None, ...] = (None,) * n_layers
        elif layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif mt in ("qwen2", "qwen3", "qwen3_moe"):
            first = integer(hf, "max_window_layers", n_layers, minimum=0)
            windows = tuple(window if i >= first else None for i in range(n_layers))
        else:
            windows = (window,) * n_layers
        moe, dense = None, frozenset[int]()
        if mt == "qwen3_moe":
            moe = MoEArgs.from_hf(dict(hf), "greedy", router_fp32=False)
            step = integer(hf, "decoder_sparse_step", 1)
            dense = frozenset(i for i in range(n_layers)
                              if i in set(hf.get("mlp_only_layers") or ()) or (i + 1) % step)
        return cls(
            model_type=mt,
            vocab_size=integer(hf, "vocab_size"),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=integer(hf, "head_dim", hidden // heads),
            intermediate_size=integer(hf, "intermediate_size"),
            eps=positive_number(hf, "rms_norm_eps", 1e-6),
            context_length=integer(hf, "max_position_embeddings", 2048),
            rope=rope_parameters(dict(hf)),
            qkv_bias=flag(hf, "attention_bias", mt == "qwen2"),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            o_bias=flag(hf, "attention_bias", False),
            mlp_bias=flag(hf, "mlp_bias", False),
            tie_embeddings=flag(hf, "tie_word_embeddings", False),
            windows=windows,
            moe=moe,
            dense_layers=dense,
        )

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.dense_layers

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the transformers checkpoint, with its shape."""
        c, h, kv, d, f = self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, c)}
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (c,)
            for name, rows in (("q", h * d), ("k", kv * d), ("v", kv * d)):
                out[p + f"self_attn.{name}_proj.weight"] = (rows, c)
                if self.qkv_bias:
                    out[p + f"self_attn.{name}_proj.bias"] = (rows,)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (d,)
                out[p + "self_attn.k_norm.weight"] = (d,)
            out[p + "self_attn.o_proj.weight"] = (c, h * d)
            if self.o_bias:
                out[p + "self_attn.o_proj.bias"] = (c,)
            out[p + "post_attention_layernorm.weight"] = (c,)
            if self.is_moe(i):
                assert self.moe is not None
                fe = self.moe.intermediate_size
                out[p + "mlp.gate.weight"] = (self.moe.n_experts, c)
                for e in range(self.moe.n_experts):
                    for name, shape in (("gate", (fe, c)), ("up", (fe, c)), ("down", (c, fe))):
                        out[p + f"mlp.experts.{e}.{name}_proj.weight"] = shape
                continue
            for name, shape in (("gate", (f, c)), ("up", (f, c)), ("down", (c, f))):
                out[p + f"mlp.{name}_proj.weight"] = shape
                if self.mlp_bias:
                    out[p + f"mlp.{name}_proj.bias"] = (shape[0],)
        out["model.norm.weight"] = (c,)
        if not self.tie_embeddings:
            out["lm_head.weight"] = (self.vocab_size, c)
        return out


#: fused module → the transformers modules it concatenates (along the output dim).
FUSED: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.)(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(.+)$")


# --- layers ---------------------------------------------------------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, layer: int, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.layer, self.attn, self.fused = layer, attn, fused
        self.h, self.kv, self.d = a.n_heads, a.n_kv_heads, a.head_dim
        self.window = None if attn.recurrent else a.windows[layer]  # running sums take no window
        self.scale = a.head_dim**-0.5
        c = a.hidden_size
        if fused:
            self.qkv_proj = nn.Linear(c, (self.h + 2 * self.kv) * self.d, bias=a.qkv_bias)
        else:
            self.q_proj = nn.Linear(c, self.h * self.d, bias=a.qkv_bias)
            self.k_proj = nn.Linear(c, self.kv * self.d, bias=a.qkv_bias)
            self.v_proj = nn.Linear(c, self.kv * self.d, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, c, bias=a.o_bias)
        self.qk_norm = a.qk_norm
        if a.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.d, a.eps), RMSNorm(self.d, a.eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | AttentionContext | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.h, self.kv, self.d
        if self.fused:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, d)  # (B, T, H + 2Hkv, D)
            qk = qkv[:, :, : h + kv]  # (B, T, H + Hkv, D)
            if self.qk_norm:
                qk = torch.cat([self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])], dim=2)
            qk = apply_rope_fast(qk, cos, sin)  # (B, T, H + Hkv, D): one rope for q and k
            q = qk[:, :, :h].transpose(1, 2)  # (B, H, T, D)
            k = qk[:, :, h:].transpose(1, 2)  # (B, Hkv, T, D)
            v = qkv[:, :, h + kv :].transpose(1, 2)  # (B, Hkv, T, D)
        else:  # reference path, module for module as transformers
            q, k = self.q_proj(x).view(b, t, h, d), self.k_proj(x).view(b, t, kv, d)  # (B, T, H|Hkv, D)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, T, D)
            k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)  # (B, Hkv, T, D)
        if isinstance(cache, AttentionContext):  # the engine's rows at their own positions (paged pool)
            o = cache.attend(self.layer, q, k, v, self.attn, self.scale, self.window is not None)  # (B, H, T, D)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, h * d))  # (B, T, C)
        if isinstance(start, torch.Tensor):  # static decode (CUDA graphs): whole buffers, mask covers them
            k, v = cache.update_static(self.layer, k, v, start)  # (B, Hkv, Tcap, D)
            o = self.attn(q, k, v, mask, self.scale)  # (B, H, 1, D)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, h * d))  # (B, 1, C)
        if cache is not None and self.attn.recurrent:
            o = self.attn.recurrent_step(self.layer, q, k, v, mask, self.scale, cache)  # (B, H, T, D)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, h * d))  # (B, T, C)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)  # (B, Hkv, S, D)
            if mask is not None and cache.compresses:
                mask = cache.select_mask(self.layer, mask)  # columns of the slots the cache kept
        s = k.shape[2]
        if self.window is not None and t == 1 and s > self.window:
            k, v = k[:, :, s - self.window :], v[:, :, s - self.window :]  # decode: only the window
            if mask is not None:
                mask = mask[..., s - self.window :]
        o = self.attn(q, k, v, mask, self.scale)  # (B, H, T, D)
        if cache is not None and cache.observes_queries:
            cache.observe(self.layer, q, k, mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, h * d))  # (B, T, C)


class LlamaBlock(nn.Module):
    def __init__(self, a: LlamaArgs, layer: int, attn: AttentionCall, fused: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.eps)
        self.self_attn = LlamaAttention(a, layer, attn, fused)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.eps)
        if a.is_moe(layer):
            assert a.moe is not None
            self.mlp: nn.Module = SparseMoE(a.moe, grouped=fused)
        else:
            self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, a.mlp_bias, fused)
        self.windowed = a.windows[layer] is not None and not attn.recurrent

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: tuple[torch.Tensor | None, torch.Tensor | None],
        cache: KVCache | AttentionContext | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        mask = masks[1] if self.windowed else masks[0]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """``first``/``last``: whether this (pipeline stage's) model embeds the ids and holds the final norm."""

    def __init__(self, a: LlamaArgs, attn: AttentionCall, fused: bool, first: bool = True, last: bool = True) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size) if first else None
        self.layers = nn.ModuleList(LlamaBlock(a, i, attn, fused) for i in range(a.n_layers))
        self.norm = RMSNorm(a.hidden_size, a.eps) if last else None


class LlamaForCausalLM(CausalLM):
    """``stage``: the pipeline stage this model is (``a`` then describes its layers alone, numbered
    from 0, see :func:`stage_args`); None: the whole model."""

    def __init__(self, a: LlamaArgs, attn: AttentionCall, fused: bool, stage: PipelineStage | None = None) -> None:
        super().__init__()
        self.args = a
        self.fused = fused
        self.stage = stage
        first, last = stage is None or stage.first, stage is None or stage.last
        self.model = LlamaBackbone(a, attn, fused, first, last)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False) if last else None
        inv_freq, scaling = rope_inv_freq(a.rope, a.head_dim, a.context_length)
        self.rope = RotaryEmbedding(inv_freq, scaling)
        self.context_length = a.context_length
        windows = [w for w in a.windows if w is not None and not attn.recurrent]
        self.min_window = min(windows) if windows else None
        #: the attention plugin decodes from a fixed-size state (linear attention).
        self.recurrent = attn.recurrent
        #: CPU ``auto`` layout: linear weights follow the batch size (see :meth:`prepare_batch`).
        self.batch_layout = False
        #: whether the device packed the linear layers in its own layout (None: not asked yet).
        self.device_layout: bool | None = None

    def prepare_batch(self, batch_size: int, switch: bool = True) -> None:
        """Before a generate of ``batch_size`` rows, on the CPU ``auto`` layout: the first time, the
        device may take the linear layers into its own layout (``Device.pack_linear``: the cpu
        device's AVX-512 panel kernel), which then serves every batch size. Else oneDNN-packed
        weights for 2+ rows and ``kn`` for one (:mod:`dsr1.models.packing` has the figures).
        ``switch=False`` (a compiled decode step, which keeps the layout it was first traced on) asks
        the device the first time, before any trace, and never switches between oneDNN and ``kn``."""
        if not self.batch_layout or self.device_layout:
            return  # (the device's layout serves every batch size)
        with self.pipeline.device.relayout_memory():  # the old layouts' buffers leave the resident set
            if self.device_layout is None:  # first generate: the device's own kernels, where it has them
                self.device_layout = pack_for_device_(self, self.pipeline.device) > 0
                if self.device_layout or not switch:
                    return
            if not switch:
                return
            if batch_size > 1:
                pack_linears_(self)
            else:
                unpack_linears_(self)

    def cache_shape(self, batch_size: int, max_len: int) -> CacheShape:
        a = self.args
        if self.recurrent:  # fixed-size states only (KVCache.state): no per-token K/V slots
            max_len = 0
        return CacheShape(a.n_layers, batch_size, max_len, a.n_kv_heads, a.head_dim)

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        a = self.args
        if isinstance(self.lm_head, ParallelLMHead):
            raise Dsr1Error("this model holds one tensor-parallel rank's shards (parallel.tensor > 1); save it "
                            "from a load with parallel.tensor 1")
        if self.stage is not None:
            raise Dsr1Error("this model holds one pipeline stage's layers (parallel.pipeline > 1); save it "
                            "from a load with parallel.pipeline 1")
        split = {
            "self_attn.qkv_proj": [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim],
            "mlp.gate_up_proj": [a.intermediate_size, a.intermediate_size],
        }
        for name, t in self.state_dict().items():
            if a.tie_embeddings and name == "lm_head.weight":
                continue
            if ".experts." in name and not re.search(r"experts\.\d", name):  # stacked experts
                yield from unstack_experts(name, t)
                continue
            m = _FUSED_RE.match(name)
            if m is None:
                yield name, t
                continue
            prefix, fused, suffix = m.groups()
            sizes = split[fused]
            parts = t.split(sizes, dim=0) if t.dim() and t.shape[0] == sum(sizes) else [t] * len(sizes)
            for part_name, part in zip(FUSED[fused], parts):
                yield f"{prefix}{part_name}.{suffix}", part


# --- building -----------------------------------------------------------------------------------


class LlamaOptions(LoadOptions):
    #: fuse q/k/v and gate/up projections into one matmul each at load time.
    fuse: bool = True
    #: memory layout of linear weights: ``nk`` (out, in) as stored, ``kn`` the transpose kept contiguous
    #: (``weight`` stays an (out, in) view), ``auto`` = ``kn`` on CPU, where MKL's small-batch matmul reads
    #: that layout faster at small batches (plugins/devices/cpu/README.md), else ``nk``.
    #: On CPU with fp32 weights, ``auto`` also hands the linear layers to the device's own kernel before
    #: the first generate (the cpu device's panel kernel), or else repacks them for oneDNN while
    #: generating 2+ rows and back to ``kn`` for one row (:meth:`LlamaForCausalLM.prepare_batch`,
    #: :mod:`dsr1.models.packing`).
    weight_layout: Literal["auto", "nk", "kn"] = "auto"


def build_llama(hf: Mapping[str, Any], reader: Any, pipeline: Any, options: LlamaOptions) -> LlamaForCausalLM:
    """Build on the meta device, then assign the checkpoint's tensors (no second copy)."""
    a = LlamaArgs.from_hf(hf)
    names = check_names(
        reader,
        a.hf_tensor_shapes(),
        ignorable=lambda n: n.endswith("rotary_emb.inv_freq") or (a.tie_embeddings and n == "lm_head.weight"),
    )
    dtype = choose_dtype(options, pipeline, reader)
    state = build_state(pipeline)  # before weight_device: the pool may plan from the checkpoint first
    device = pipeline.pool.weight_device(pipeline.device)  # the pool decides where the weights live
    parallel = pipeline.config.parallel
    stage, stage_group = None, None
    if parallel is not None and parallel.pipeline > 1:
        check_pipeline(parallel.pipeline, a.model_type, a.n_layers)
        if parallel.tensor > 1:  # before the rendezvous: a shape that cannot split needs no torchrun to say so
            check_tensor(parallel.tensor, a.model_type, a.n_heads, a.n_kv_heads, a.intermediate_size)
        graph = pipeline.config.choice("graph")
        if graph is not None and graph.name != "eager":
            raise Dsr1Error(f"parallel.pipeline {parallel.pipeline} runs eagerly (each stage sends its hidden "
                            f"states from Python), but graph is {graph.name!r}; use graph eager")
        stage, stage_group = join_stages(parallel, a.n_layers, device)
    plan = None
    if parallel is not None and parallel.tensor > 1:
        with stage_tensor_group(stage_group) if stage_group is not None else nullcontext():
            plan = TensorPlan.create(a, pipeline, device)
    local = a if plan is None else plan.local  # this rank's heads, KV heads and MLP width
    if stage is not None:
        local = stage_args(local, stage)
        names = stage_names(names, stage, a.tie_embeddings)
    attn = bind_attention(pipeline, local.n_heads, local.n_kv_heads, hf)
    with torch.device("meta"):
        model = LlamaForCausalLM(local, attn, options.fuse, stage)
        if plan is not None:
            plan.shard_modules_(model)
            if stage is not None:  # shard_modules_ swaps in an embedding and a head on every stage
                model.model.embed_tokens = model.model.embed_tokens if stage.first else None
                model.lm_head = model.lm_head if stage.last else None
    layout = options.weight_layout
    # the layout follows where the model computes, not where its weights are read to (a pool may read on the CPU)
    on_cpu = pipeline.device.torch_device().type == "cpu"
    kn = layout == "kn" or (layout == "auto" and on_cpu)
    linear_weights = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if local.tie_embeddings:
        linear_weights.discard("lm_head.weight")  # shares the embedding's (V, C) storage
    order = sorted(model.state_dict(), key=lambda n: n != "lm_head.weight")  # largest first: smallest peak
    # the device's kernel, else oneDNN-packed weights, for CPU decode (dsr1.models.packing). Whatever the quant
    # policy: the choice is made at the first generate, after the policy ran, on the layers it left plain fp32
    batch_layout = layout == "auto" and on_cpu and torch.backends.mkldnn.is_available()
    with pipeline.device.relayout_memory():  # each tensor's read buffer is freed once it is placed
        read = (plan.reader(reader, names, dtype, device) if plan is not None
                else lambda n: reader.read(names[n], dtype, device))
        _read_state(read, order, local, kn, linear_weights, state)
    assign_weights_(model, state, local.tie_embeddings, device, hf)
    model.batch_layout = batch_layout
    return model


def stage_args(a: LlamaArgs, stage: PipelineStage) -> LlamaArgs:
    """``a`` for the layers of ``stage`` alone, numbered from 0: their windows and dense layers
    follow their indices in the whole model. A stage's ``lm_head`` is its own tensor (the last
    stage reads the embedding matrix into it when the checkpoint ties them)."""
    lo, hi = stage.layers.start, stage.layers.stop
    return dataclasses.replace(a, n_layers=hi - lo, windows=a.windows[lo:hi], tie_embeddings=False,
                               dense_layers=frozenset(i - lo for i in a.dense_layers if lo <= i < hi))


def _read_state(
    read: Callable[[str], torch.Tensor], order: list[str], a: LlamaArgs, kn: bool, linear_weights: set[str],
    state: dict[str, torch.Tensor],
) -> None:
    """Read every tensor of ``order`` into ``state`` (``read``: a checkpoint tensor by its model name,
    this rank's shard of it under tensor parallelism), fusing q/k/v and gate/up, ``kn`` where asked."""
    for name in order:
        if a.tie_embeddings and name == "lm_head.weight":
            continue
        if a.moe is not None and "experts." in name:  # checkpoints hold one tensor per expert: stack them
            sources, how = expert_sources(name.rsplit("experts.", 1)[0], a.moe.n_experts)[name]
            state[name] = stack_experts([read(s) for s in sources], how)
            continue
        m = _FUSED_RE.match(name)
        if m is None:
            parts = [read(name)]
        else:
            prefix, fused, suffix = m.groups()
            parts = [read(f"{prefix}{p}.{suffix}") for p in FUSED[fused]]
        if kn and name in linear_weights:
            # (in, out) contiguous, one copy per tensor as it arrives; the parameter is its (out, in) view
            state[name] = torch.cat([t.t() for t in parts], dim=1).t()
        else:
            state[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (sum of outputs, in)
        del parts

class LlamaBuilder(CheckpointBuilder):
    """Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE checkpoints → :class:`LlamaForCausalLM`."""

    Options = LlamaOptions
    options: LlamaOptions

    def build_model(self, hf_config: Mapping[str, Any], reader: Any, pipeline: Any) -> LlamaForCausalLM:
        return build_llama(hf_config, reader, pipeline, self.options)


@hookimpl
def dsr1_model() -> PluginSpec:
    return PluginSpec(
        name="llama",
        family="model",
        impl=LlamaBuilder,
        options=LlamaOptions,
        capabilities=frozenset({"model_type:llama", "model_type:mistral", "model_type:qwen2", "model_type:qwen3",
                                "model_type:qwen3_moe"}),
        description="Llama 2/3, Mistral, Qwen2, Qwen3 and Qwen3-MoE decoder-only LMs (fused qkv and gate/up at load)",
    )

"""Tensor parallelism for the llama family (Megatron-style): each of N ranks holds 1/N of every
large matrix and the ranks meet twice per layer and at both ends of the model.

* q/k/v and gate/up are **column-parallel**: rank r computes its own query heads (``H/N``), its KV
  heads (``Hkv/N``, or one replicated head when ``Hkv < N``) and its ``F/N`` slice of the MLP, with
  no communication. The llama builder fuses each group into one matmul; each part is sharded on its
  own and the shards are fused again per rank, so the fused layout ``[q | k | v]`` holds locally.
* o_proj and down_proj are **row-parallel** (:class:`RowParallelLinear`): each rank multiplies its
  slice of the inputs by its columns of the weight, an all-reduce sums the partial outputs, and the
  bias (stored whole) is added once after it.
* the embedding is **vocabulary-parallel** (:class:`VocabParallelEmbedding`): rank r holds rows
  ``[r*S, (r+1)*S)``, looks up the ids that fall there, zeroes the others and all-reduces;
  lm_head (:class:`ParallelLMHead`) computes its ``S`` logits per token and all-gathers them, so
  every rank holds the same full logits and picks the same greedy token. ``S = ceil(V / N)``; the
  last rank's missing rows are zeros and the padded logits are cut off after the gather.
* mixture-of-experts layers (Qwen3-MoE) are **expert-parallel** (:class:`ExpertParallelMoE`): rank r
  holds ``E/N`` whole experts, the router is replicated, each rank weighs its experts' outputs for
  every token and an all-reduce sums them.

The row-parallel layers and the head are wrappers around a plain ``nn.Linear`` child named
``linear``, which does the local matmul: a quant policy (or the CPU packing) that swaps linear
layers swaps that child and the wrapper's collective stays. Their ``state_dict`` names are the
unwrapped ones (``o_proj.weight``, ``o_proj.qweight``), so checkpoints load as they are; module
names (quant ``skip`` patterns, the precision map) see ``o_proj.linear``. Column-parallel layers
are plain ``nn.Linear`` shards and quantize as they are. Quantization runs after the shards are
loaded, on each rank's shard: per-row scales of a column-parallel layer are the single process's,
those of a row-parallel layer are computed over the rank's slice of the row (close to the
single process's, not equal), and group-wise int4 needs its group to divide each rank's slice.

:class:`TensorPlan` is resolved once at build: the per-rank shapes (:attr:`TensorPlan.local`), the
module swap, and the slice each checkpoint tensor contributes (:meth:`TensorPlan.rule`), read with
:meth:`CheckpointReader.read_slice` so that no rank ever holds a whole matrix (nor another rank's
experts). The forward pass sees only the layers below: three plain functions call the collectives.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.models.checkpoint import CheckpointReader
from dsr1.models.moe import Experts, MoEArgs, SparseMoE
from dsr1.parallel.topology import TensorGroup, check_tensor, join, lost

#: quant plugins whose layers shard: the float casts, and the policies that swap ``nn.Linear`` layers for
#: their own one by one (each rank's shards; the wrappers below keep the collectives around them).
TP_QUANT = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "w8a8", "dynamic")


# --- collectives ------------------------------------------------------------------------------


def all_reduce_(x: torch.Tensor, group: TensorGroup) -> torch.Tensor:
    """``x`` summed over the ranks, in place."""
    try:
        dist.all_reduce(x, group=group.group)
    except RuntimeError as err:
        raise lost(group, "all_reduce", err) from None
    return x


def all_gather_last(x: torch.Tensor, group: TensorGroup) -> torch.Tensor:
    """Every rank's ``x`` side by side along the last dim: ``(..., S)`` → ``(..., N*S)``."""
    parts = [torch.empty_like(x) for _ in range(group.size)]
    try:
        dist.all_gather(parts, x.contiguous(), group=group.group)
    except RuntimeError as err:
        raise lost(group, "all_gather", err) from None
    return torch.cat(parts, dim=-1)


# --- layers -----------------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """A tensor-parallel layer around this rank's ``nn.Linear`` (``self.linear``), which quant policies and
    the CPU packing may swap for their own layer. Its tensors keep the unwrapped names in ``state_dict``
    (``prefix.weight``, not ``prefix.linear.weight``), as the checkpoint names them."""

    linear: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_unwrap_names)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = set(self._parameters) | set(self._buffers)
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in own]:
            if not key.startswith(prefix + "linear."):
                state_dict[prefix + "linear." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _unwrap_names(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "linear.")]:
        state[prefix + key[len(prefix) + len("linear."):]] = state.pop(key)


class RowParallelLinear(_Wrapper):
    """``y = sum over ranks (x_r @ W_r^T) + b``: this rank's input features and weight columns
    (``linear``, no bias), then an all-reduce; the bias is whole on every rank and added once, after the sum."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: TensorGroup) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_local, out_features, group
        self.linear = nn.Linear(in_local, out_features, bias=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_(self.linear(x), self.group)  # (..., out): summed partial products
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + S)`` of the vocabulary; other ids look up zeros, and the all-reduce
    fills each id's row from the rank that holds it. An ``nn.Embedding`` so that a tied lm_head's
    weight is known to be the embedding's (:func:`dsr1.models.packing.packable`)."""

    def __init__(self, shard: int, hidden: int, start: int, group: TensorGroup) -> None:
        super().__init__(shard, hidden)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # (B, T): ids another rank holds
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        return all_reduce_(x.masked_fill_(outside.unsqueeze(-1), 0.0), self.group)


class ParallelLMHead(_Wrapper):
    """This rank's ``S`` logits per token (``linear``), all-gathered into the full ``V`` on every rank."""

    def __init__(self, hidden: int, shard: int, vocab: int, group: TensorGroup) -> None:
        super().__init__()
        self.in_features, self.vocab, self.group = hidden, vocab, group
        self.linear = nn.Linear(hidden, shard, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        """This rank's ``(S, C)`` rows (the embedding's shard when tied)."""
        return self.linear.weight  # type: ignore[return-value]  # a plain nn.Linear until a policy swaps it

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # a tied head is handed the embedding's parameter (assign_weights_)
            self.linear.weight = value
            return
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last(self.linear(x), self.group)  # (..., N*S)
        return logits if logits.shape[-1] == self.vocab else logits[..., : self.vocab]  # (..., V)


class ExpertParallelMoE(SparseMoE):
    """A sparse MoE block whose :class:`~dsr1.models.moe.Experts` are this rank's ``E/N`` whole experts; the
    router (replicated) picks among all ``E``, and an all-reduce sums the ranks' weighted outputs."""

    def __init__(self, a: MoEArgs, grouped: bool, group: TensorGroup) -> None:
        super().__init__(a, grouped)
        count = a.n_experts // group.size
        self.experts = Experts(a, grouped, first=group.rank * count, count=count)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_(super().forward(x), self.group)  # (B, T, C): every expert's share summed


# --- the plan ---------------------------------------------------------------------------------

#: what a checkpoint tensor's slice is: (dim, start, stop, rows after zero padding)
Rule = tuple[int, int, int, int]

_ATTN = re.compile(r"self_attn\.([qkvo])_proj\.(weight|bias)$")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.")
_MLP = re.compile(r"mlp\.(gate|up|down)_proj\.(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Everything tensor parallelism decides for one llama model on this rank, resolved at build."""

    group: TensorGroup
    #: the checkpoint's shapes
    full: Any  # LlamaArgs (the models layer imports this one, not the other way round)
    #: this rank's shapes: local heads, KV heads and MLP width (the KV cache holds local heads only)
    local: Any
    #: the first KV head this rank holds
    kv_start: int
    #: vocabulary rows per rank (the last rank's tail padded with zeros)
    vocab_shard: int

    @classmethod
    def create(cls, full: Any, pipeline: Any, device: torch.device) -> TensorPlan:
        """Check the model and the config against ``parallel.tensor``, join the ranks, and plan."""
        parallel = pipeline.config.parallel
        n = parallel.tensor
        dense = full.moe is None or bool(full.dense_layers)  # a model of experts only has no dense MLP to split
        check_tensor(n, full.model_type, full.n_heads, full.n_kv_heads, full.intermediate_size if dense else 0,
                     experts=0 if full.moe is None else full.moe.n_experts)
        check_quant(n, full, dense, pipeline)
        group = join(n, parallel.timeout_s, device)
        kv = full.n_kv_heads
        kv_local = kv // n if kv >= n else 1
        kv_start = group.rank * kv_local if kv >= n else group.rank // (n // kv)
        local = dataclasses.replace(full, n_heads=full.n_heads // n, n_kv_heads=kv_local,
                                    intermediate_size=full.intermediate_size // n)
        return cls(group, full, local, kv_start, -(-full.vocab_size // n))

    def shard_modules_(self, model: nn.Module) -> None:
        """Swap the row-parallel and vocabulary layers of ``model`` (built on meta with the local
        shapes) for their tensor-parallel kinds; column-parallel layers need no swap."""
        a, g, c = self.local, self.group, self.full.hidden_size
        backbone = model.model  # type: ignore[union-attr]  # LlamaForCausalLM
        backbone.embed_tokens = VocabParallelEmbedding(self.vocab_shard, c, g.rank * self.vocab_shard, g)
        for block in backbone.layers:
            block.self_attn.o_proj = RowParallelLinear(a.n_heads * a.head_dim, c, a.o_bias, g)
            if a.is_moe(block.self_attn.layer):
                block.mlp = ExpertParallelMoE(a.moe, block.mlp.experts.grouped, g)
            else:
                block.mlp.down_proj = RowParallelLinear(a.intermediate_size, c, a.mlp_bias, g)
        model.lm_head = ParallelLMHead(c, self.vocab_shard, self.full.vocab_size, g)

    def rule(self, name: str) -> Rule | None:
        """The slice of checkpoint tensor ``name`` this rank holds; ``None``: the whole tensor."""
        r, hd = self.group.rank, self.full.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            start = min(r * self.vocab_shard, self.full.vocab_size)
            return 0, start, min(start + self.vocab_shard, self.full.vocab_size), self.vocab_shard
        m = _EXPERT.search(name)
        if m is not None:  # whole experts: this rank's, and an empty slice (nothing read) of the others
            count = self.full.moe.n_experts // self.group.size
            return None if r * count <= int(m.group(1)) < (r + 1) * count else (0, 0, 0, 0)
        m = _ATTN.search(name)
        if m is not None:
            which, kind = m.groups()
            h, kv = self.local.n_heads, self.local.n_kv_heads
            if which == "q":
                return 0, r * h * hd, (r + 1) * h * hd, h * hd
            if which in ("k", "v"):
                return 0, self.kv_start * hd, (self.kv_start + kv) * hd, kv * hd
            return (1, r * h * hd, (r + 1) * h * hd, 0) if kind == "weight" else None  # o: columns; bias whole
        m = _MLP.search(name)
        if m is not None:
            which, kind = m.groups()
            f = self.local.intermediate_size
            if which in ("gate", "up"):
                return 0, r * f, (r + 1) * f, f
            return (1, r * f, (r + 1) * f, 0) if kind == "weight" else None  # down: columns; bias whole
        return None  # norms: every rank needs them whole

    def reader(self, reader: Any, names: dict[str, str], dtype: torch.dtype,
               device: torch.device) -> Callable[[str], torch.Tensor]:
        """``read(model name)`` → this rank's shard of that checkpoint tensor, on ``device``."""

        def read(name: str) -> torch.Tensor:
            rule = self.rule(name)
            if rule is None:
                return reader.read(names[name], dtype, device)  # type: ignore[no-any-return]
            dim, start, stop, rows = rule
            if isinstance(reader, CheckpointReader):
                t = reader.read_slice(names[name], dim, start, stop, dtype, device)
            else:  # an in-memory reader (build_from): its tensors are already whole in memory
                t = reader.read(names[name], dtype, device).narrow(dim, start, stop - start).clone()
            if dim == 0 and t.shape[0] < rows:  # the vocabulary's last shard: zero rows up to S
                t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
            return t

        return read


def check_quant(n: int, full: Any, dense: bool, pipeline: Any) -> None:
    """The quant policy against ``parallel.tensor`` ``n``, before any rank reads a weight: one that is not
    known to shard, a ``skip`` pattern that names a wrapped layer by its unwrapped name only, or a group
    size that does not divide a row-parallel layer's slice are one-line errors."""
    quant = pipeline.config.choice("quant")
    if quant is None:
        return
    if quant.name not in TP_QUANT:
        raise Dsr1Error(f"parallel.tensor {n} with quant {quant.name!r}: that policy is not known to shard; use "
                        f"one of {', '.join(TP_QUANT)} or parallel.tensor 1")
    options = getattr(pipeline.quant, "options", None)  # the policy's validated options (defaults filled in)
    skip = list(getattr(options, "skip", None) or [])
    # the row-parallel layers: (module name, input dim in one process)
    rows = [(f"model.layers.{i}.self_attn.o_proj", full.n_heads * full.head_dim) for i in range(full.n_layers)]
    if dense:
        rows += [(f"model.layers.{i}.mlp.down_proj", full.intermediate_size) for i in range(full.n_layers)
                 if not full.is_moe(i)]
    for pattern in skip:
        for name in [r[0] for r in rows] + ["lm_head"]:
            if fnmatch.fnmatchcase(name, pattern) and not fnmatch.fnmatchcase(f"{name}.linear", pattern):
                raise Dsr1Error(f"quant skip {pattern!r} under parallel.tensor {n}: layer {name!r} holds its linear "
                                f"as {name + '.linear'!r}; write {pattern + '*'!r}, which names it either way")
    group = getattr(options, "group_size", None)
    if not isinstance(group, int):
        return
    for name, k in rows:
        local = k // n
        if k % group == 0 and local % group and not any(fnmatch.fnmatchcase(f"{name}.linear", p) for p in skip):
            fits = [g for g in (32, 64, 128) if local % g == 0]
            tensors = [t for t in range(1, n) if k % t == 0 and (k // t) % group == 0]
            hint = (f"group_size {' or '.join(map(str, fits))}" if fits
                    else f"parallel.tensor {max(tensors)}" if tensors else "parallel.tensor 1")
            raise Dsr1Error(f"parallel.tensor {n} with {quant.name} group_size {group}: each rank's "
                            f"{name.rsplit('.', 1)[1]} takes {local} of the {k} inputs, which {group} does not "
                            f"divide; use {hint}")

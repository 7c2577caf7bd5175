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

:class:`TensorPlan` is resolved once at build: the per-rank shapes (:attr:`TensorPlan.local`), the
module swap, and the slice each checkpoint tensor contributes (:meth:`TensorPlan.rule`), read with
:meth:`CheckpointReader.read_slice` so that no rank ever holds a whole matrix. The forward pass sees
only the layers below: three plain functions call the collectives.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.models.loading import CheckpointReader
from dsr1.parallel.topology import TensorGroup, check_tensor, join, lost

#: quant plugins that only pick a dtype; the others swap linear layers for their own (not sharded yet).
DTYPE_ONLY_QUANT = ("fp32", "bf16", "fp16")


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


class RowParallelLinear(nn.Linear):
    """``y = sum over ranks (x_r @ W_r^T) + b``: this rank's input features and weight columns,
    then an all-reduce; the bias is whole on every rank and added once, after the sum."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: TensorGroup) -> None:
        super().__init__(in_local, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_(F.linear(x, self.weight), self.group)  # (..., out): summed partial products
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


class ParallelLMHead(nn.Linear):
    """This rank's ``S`` logits per token, all-gathered into the full ``V`` on every rank."""

    def __init__(self, hidden: int, shard: int, vocab: int, group: TensorGroup) -> None:
        super().__init__(hidden, shard, bias=False)
        self.vocab, self.group = vocab, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last(F.linear(x, self.weight), self.group)  # (..., N*S)
        return logits if logits.shape[-1] == self.vocab else logits[..., : self.vocab]  # (..., V)


# --- the plan ---------------------------------------------------------------------------------

#: what a checkpoint tensor's slice is: (dim, start, stop, rows after zero padding)
Rule = tuple[int, int, int, int]

_ATTN = re.compile(r"self_attn\.([qkvo])_proj\.(weight|bias)$")
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
        check_tensor(n, full.model_type, full.n_heads, full.n_kv_heads, full.intermediate_size)
        quant = pipeline.config.choice("quant")
        if quant is not None and quant.name not in DTYPE_ONLY_QUANT:
            raise Dsr1Error(f"parallel.tensor {n} with quant {quant.name!r}: quantized layers are not sharded yet; "
                            f"use one of {', '.join(DTYPE_ONLY_QUANT)} or parallel.tensor 1")
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
            if a.is_moe(block.self_attn.layer):  # refused by check_tensor; kept explicit
                raise Dsr1Error("tensor parallelism does not shard mixture-of-experts layers yet")
            block.mlp.down_proj = RowParallelLinear(a.intermediate_size, c, a.mlp_bias, g)
        model.lm_head = ParallelLMHead(c, self.vocab_shard, self.full.vocab_size, g)

    def rule(self, name: str) -> Rule | None:
        """The slice of checkpoint tensor ``name`` this rank holds; ``None``: the whole tensor."""
        r, hd = self.group.rank, self.full.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            start = min(r * self.vocab_shard, self.full.vocab_size)
            return 0, start, min(start + self.vocab_shard, self.full.vocab_size), self.vocab_shard
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

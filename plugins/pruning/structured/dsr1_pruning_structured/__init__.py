"""``structured``: remove whole attention heads and FFN channels, and shrink the matrices.

The model really gets smaller: ``q/k/v`` lose the rows of removed heads and ``o`` their columns;
``gate/up`` (llama) or ``intermediate`` (bert) lose the rows of removed FFN channels and
``down`` / ``output`` their columns. ``model.config`` is updated (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size``), so a saved stage is a normal
checkpoint of a smaller model. Every layer keeps the same counts (the config format has one
count per model); *which* heads and channels go is chosen per layer by importance.

Importance of input channel ``j`` of an output projection (``o_proj`` / ``down_proj``, bert's
``attention.output.dense`` / ``output.dense``) is ``‖W[:, j]‖₂² · ‖X_j‖₂²`` with ``X`` from the
calibration text (``importance="activation"``, the structured form of Wanda's score), or
``‖W[:, j]‖₂²`` (``importance="magnitude"``); a head's importance is the sum over its ``head_dim``
channels.

How many: a call at sparsity ``s`` keeps ``(1 - s)`` of the prunable linear weights (all linears
but the head). Heads are set relative to the dense model (kept in ``config["dsr1_dense_shape"]``),
so a progressive run and a one-shot run at the same sparsity remove the same number of heads;
the FFN width then absorbs the rest of the budget, so the realized sparsity is within one FFN
channel of the target. With grouped-query attention (llama ``n_heads > n_kv_heads``) query heads
are removed evenly from every key/value group first; whole groups go only once every group is
down to one query head.

Supported: dsr1's ``llama`` family (loaded unfused: ``fuse=False``) and ``bert`` models. The
single-matrix ``mask()`` (the conformance kit) prunes whole input columns by the same score.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from dsr1_sdk import Dsr1Error, Field, PluginSpec, Pruner, PruningOptions, hookimpl
from dsr1_sdk.pruning import (
    check_sparsity,
    input_norms,
    lowest_k_mask,
    n_pruned,
    prunable_linears,
    usable_batches,
    wanda_score,
)

__all__ = ["StructuredOptions", "StructuredPruner", "dsr1_pruning"]

DENSE_KEY = "dsr1_dense_shape"


class StructuredOptions(PruningOptions):
    """Options of the ``structured`` pruner (``sparsity`` has no default: an engine config sets it)."""

    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="‖W[:, j]‖·‖X_j‖ from calibration text, or ‖W[:, j]‖ alone")
    heads: bool = Field(True, description="remove attention heads (else only FFN channels)")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name suffixes never counted")


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest ``scores``, ascending (ties: the lower index is kept)."""
    return lowest_k_mask(scores, scores.numel() - keep).nonzero().squeeze(1)  # the lowest go first


def shrink(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A copy of ``linear`` with only ``rows`` (outputs) and ``cols`` (inputs) kept."""
    w = linear.weight.detach()  # (out, in)
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    return new


def _keep_mask(n: int, kept: torch.Tensor, device: torch.device) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[kept] = True
    return keep


@dataclasses.dataclass
class _Arch:
    """Where the parts of one architecture are; ``ffn_mult`` matrices of (F, C) per channel."""

    kind: str  # "llama" / "bert"
    blocks: list[Any]
    hidden: int
    head_dim: int
    n_heads: int
    n_kv: int
    ffn: int
    ffn_mult: int

    def attn_params(self, h: int, kv: int) -> int:
        return (2 * h + 2 * kv) * self.head_dim * self.hidden  # q + o, k + v

    def o_proj(self, blk: Any) -> nn.Linear:
        return blk.self_attn.o_proj if self.kind == "llama" else blk.attention.output.dense  # type: ignore[no-any-return]

    def down(self, blk: Any) -> nn.Linear:
        return blk.mlp.down_proj if self.kind == "llama" else blk.output.dense  # type: ignore[no-any-return]


def _arch(model: nn.Module) -> _Arch:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict):
        raise Dsr1Error(f"structured pruning needs a dsr1 llama-family or bert model; got {type(model).__name__}")
    m: Any = model  # dsr1's LlamaForCausalLM / BertModel: attributes mypy cannot see through nn.Module
    a: Any = getattr(model, "args", None)  # their LlamaArgs / BertArgs
    if hasattr(model, "model") and hasattr(m.model, "layers"):
        blocks: list[Any] = list(m.model.layers)
        if any(getattr(b.self_attn, "fused", False) for b in blocks):
            raise Dsr1Error("structured pruning needs the llama model loaded unfused "
                            "(model options fuse=False), as dsr1 prune loads it")
        return _Arch("llama", blocks, a.hidden_size, a.head_dim, a.n_heads, a.n_kv_heads, a.intermediate_size, 3)
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        return _Arch("bert", list(m.encoder.layer), a.hidden_size, a.head_dim, a.n_heads, a.n_heads,
                     a.intermediate_size, 2)
    raise Dsr1Error(f"structured pruning needs a dsr1 llama-family or bert model; got {type(model).__name__}")


def _channel_importance(proj: nn.Linear, norm: torch.Tensor | None) -> torch.Tensor:
    """``‖W[:, j]‖² · ‖X_j‖²`` per input channel ``(in,)``."""
    imp = proj.weight.detach().float().pow(2).sum(0)  # (in,)
    return imp * norm.float().pow(2) if norm is not None else imp


class StructuredPruner(Pruner):
    """Structured head / channel pruning; see the module docstring."""

    Options = StructuredOptions
    options: StructuredOptions

    # --- one matrix (the kit's view): whole input columns --------------------------------------

    def score(self, weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return wanda_score(weight, activation_norm)  # (out, in)

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Prune the ``round(s · in)`` input columns of lowest ``‖score[:, j]‖``: a (out, in) bool mask."""
        cols = weight.shape[-1]
        col_scores = self.score(weight, activation_norm).pow(2).sum(0)  # (in,)
        keep_cols = lowest_k_mask(col_scores, n_pruned(cols, sparsity))  # (in,)
        return keep_cols[None, :].expand(weight.shape).clone()

    # --- a whole model: shrink it ----------------------------------------------------------------

    def needs_calibration(self) -> bool:
        return self.options.importance == "activation"

    def prune_(
        self,
        model: torch.nn.Module,
        sparsity: float,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Remove heads and FFN channels in place; returns keep-masks over each changed layer's
        shape before this call (a removed row or column is ``False``)."""
        check_sparsity(sparsity)
        arch = _arch(model)
        cfg: dict[str, Any] = model.config  # type: ignore[assignment]
        dense = cfg.setdefault(DENSE_KEY, {"num_attention_heads": arch.n_heads, "num_key_value_heads": arch.n_kv,
                                           "intermediate_size": arch.ffn})
        if sparsity == 0.0:
            return {}
        new_h, new_kv, new_f = self._counts(model, arch, sparsity, dense)
        norms: dict[str, torch.Tensor] = {}
        if self.options.importance == "activation":
            batches = usable_batches(calibration, "structured pruning with importance='activation'")
            projs = [(f"{i}.o", arch.o_proj(b)) for i, b in enumerate(arch.blocks)]
            projs += [(f"{i}.down", arch.down(b)) for i, b in enumerate(arch.blocks)]
            norms = input_norms(model, projs, batches)
        names = {id(m): n for n, m in model.named_modules()}
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, blk in enumerate(arch.blocks):
                if (new_h, new_kv) != (arch.n_heads, arch.n_kv):
                    self._heads(arch, blk, new_h, new_kv, norms.get(f"{i}.o"), names, masks)
                if new_f != arch.ffn:
                    self._ffn(arch, blk, new_f, norms.get(f"{i}.down"), names, masks)
        self._update_config(model, arch, new_h, new_kv, new_f)
        return masks

    def _counts(self, model: nn.Module, arch: _Arch, sparsity: float, dense: dict[str, int]) -> tuple[int, int, int]:
        """Heads, kv heads and FFN width that keep ``1 - sparsity`` of the prunable weights."""
        total = sum(m.weight.numel() for _, m in prunable_linears(model, self.options.skip))
        c, n = arch.hidden, len(arch.blocks)
        block_now = arch.attn_params(arch.n_heads, arch.n_kv) + arch.ffn_mult * arch.ffn * c
        fixed = total - n * block_now  # prunable linears outside the blocks (bert's pooler)
        budget = ((1.0 - sparsity) * total - fixed) / n  # weights each block may keep
        h0, kv0, f0 = dense["num_attention_heads"], dense["num_key_value_heads"], dense["intermediate_size"]
        ratio = max(0.0, budget / (arch.attn_params(h0, kv0) + arch.ffn_mult * f0 * c))  # vs the dense block
        h, kv = arch.n_heads, arch.n_kv
        if self.options.heads:
            want = ratio * h0  # query heads wanted, relative to the dense model
            if arch.kind == "llama" and h0 > kv0 and want >= kv0:
                kv = min(arch.n_kv, kv0)
                h = kv * max(1, min(h // kv, round(want / kv0)))  # fewer query heads per group
            else:  # whole groups, one query head each (plain heads for MHA and bert)
                kv = max(1, min(arch.n_kv, round(want)))
                h = kv
        ffn_budget = budget - arch.attn_params(h, kv)
        f = max(1, min(arch.ffn, round(ffn_budget / (arch.ffn_mult * c))))
        return h, kv, f

    def _heads(self, arch: _Arch, blk: Any, h: int, kv: int, norm: torch.Tensor | None,
               names: dict[int, str], masks: dict[str, torch.Tensor]) -> None:
        d, dev = arch.head_dim, arch.o_proj(blk).weight.device
        imp = _channel_importance(arch.o_proj(blk), norm).reshape(arch.n_heads, d).sum(1)  # (H,)
        rep, new_rep = arch.n_heads // arch.n_kv, h // kv
        groups = imp.reshape(arch.n_kv, rep)  # (Hkv, rep): query heads by their kv group
        keep_in_group = [top_indices(groups[g], new_rep) for g in range(arch.n_kv)]  # per group, ascending
        group_imp = torch.stack([groups[g][keep_in_group[g]].sum() for g in range(arch.n_kv)])  # (Hkv,)
        kept_groups = top_indices(group_imp, kv)  # (kv,)
        heads = torch.cat([g * rep + keep_in_group[int(g)] for g in kept_groups])  # (h,) ascending
        q_rows = (heads[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1).to(dev)  # (h·D,)
        kv_rows = (kept_groups[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1).to(dev)
        if arch.kind == "llama":
            sa = blk.self_attn
            parts = [("q_proj", q_rows, None), ("k_proj", kv_rows, None), ("v_proj", kv_rows, None),
                     ("o_proj", None, q_rows)]
            host = sa
        else:
            sa = blk.attention.self
            parts = [("query", q_rows, None), ("key", q_rows, None), ("value", q_rows, None)]
            host = sa
        for attr, rows, cols in parts:
            old = getattr(host, attr)
            name = names[id(old)]
            keep = torch.ones_like(old.weight, dtype=torch.bool)
            if rows is not None:
                keep &= _keep_mask(old.weight.shape[0], rows, dev)[:, None]
            if cols is not None:
                keep &= _keep_mask(old.weight.shape[1], cols, dev)[None, :]
            masks[name] = keep
            setattr(host, attr, shrink(old, rows, cols))
        if arch.kind == "bert":
            old = blk.attention.output.dense
            masks[names[id(old)]] = _keep_mask(old.weight.shape[1], q_rows, dev)[None, :].expand(old.weight.shape).clone()
            blk.attention.output.dense = shrink(old, None, q_rows)
            blk.h = h
        else:
            blk.self_attn.h, blk.self_attn.kv = h, kv

    def _ffn(self, arch: _Arch, blk: Any, f: int, norm: torch.Tensor | None,
             names: dict[int, str], masks: dict[str, torch.Tensor]) -> None:
        down = arch.down(blk)
        dev = down.weight.device
        channels = top_indices(_channel_importance(down, norm), f).to(dev)  # (F',)
        keep_ch = _keep_mask(down.weight.shape[1], channels, dev)  # (F,)
        ups = [(blk.mlp, "gate_proj"), (blk.mlp, "up_proj")] if arch.kind == "llama" else [(blk.intermediate, "dense")]
        for host, attr in ups:
            old = getattr(host, attr)
            masks[names[id(old)]] = keep_ch[:, None].expand(old.weight.shape).clone()
            setattr(host, attr, shrink(old, channels, None))
        masks[names[id(down)]] = keep_ch[None, :].expand(down.weight.shape).clone()
        if arch.kind == "llama":
            blk.mlp.down_proj = shrink(down, None, channels)
        else:
            blk.output.dense = shrink(down, None, channels)

    def _update_config(self, model: Any, arch: _Arch, h: int, kv: int, f: int) -> None:
        """The config (and the model's args) describe the new shapes."""
        cfg = model.config
        cfg["num_attention_heads"], cfg["intermediate_size"] = h, f
        if arch.kind == "llama":
            cfg["num_key_value_heads"], cfg["head_dim"] = kv, arch.head_dim
            model.args = dataclasses.replace(model.args, n_heads=h, n_kv_heads=kv, intermediate_size=f)
            call = arch.blocks[0].self_attn.attn
            if call.n_rep != 1:  # the attention plugin gets repeated keys/values: repeat to the new ratio
                call = copy.copy(call)
                call.n_rep = h // kv
                for blk in arch.blocks:
                    blk.self_attn.attn = call
        else:
            if h * arch.head_dim != arch.hidden:
                cfg["head_dim"] = arch.head_dim
            model.args = dataclasses.replace(model.args, n_heads=h, intermediate_size=f)

    def report_notes(self, device: str) -> list[str]:
        return [("structured: config.json describes the shrunk shapes (the same head count and FFN width in every "
                 "layer; the dense ones under 'dsr1_dense_shape'); a bert stage with fewer heads records 'head_dim', "
                 "which transformers' BertConfig cannot express, so it loads in dsr1 only")]


@hookimpl
def dsr1_pruning() -> PluginSpec:
    return PluginSpec(
        name="structured",
        family="pruning",
        impl=StructuredPruner,
        options=StructuredOptions,
        capabilities=frozenset({"structured", "activation_aware", "calibration"}),
        description="removes attention heads and FFN channels by importance and shrinks the matrices",
    )

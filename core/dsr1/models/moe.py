"""Mixture-of-experts layers (Qwen3-MoE, DeepSeek-V2/V3): a router picks ``k`` experts per token,
the experts are SwiGLU MLPs whose outputs are summed with the router's weights.

Shapes: ``N`` tokens (batch × time flattened), ``C`` hidden, ``E`` experts, ``F`` expert
intermediate size, ``k`` experts per token.

Experts are stored stacked, ``gate_up_proj`` ``(E, 2F, C)`` and ``down_proj`` ``(E, C, F)`` (what
transformers 5 keeps in memory; checkpoints hold one ``experts.{e}.{gate,up,down}_proj`` per
expert and the builders stack them at load). Two ways to run them:

* the reference path loops over the experts that got tokens, as transformers does: clear, and
  the oracle the fast path is tested against; it reads the routing on the host each layer;
* the grouped path sorts the ``N·k`` (token, expert) pairs by expert and runs each projection as
  one grouped GEMM (``torch._grouped_mm``) with the group offsets on the device: no host sync, so
  a CUDA graph can capture it, and only the experts that got tokens are read;
* quantized experts (int8 or fp8 rows, :meth:`Experts.quantize_`) on CUDA go to a Triton
  matrix-vector kernel that reads the quantized rows of the chosen experts
  (:mod:`dsr1.models.moe_triton`); the other CUDA paths would dequantize whole stacks per step.
  It is checked against the reference in Triton's interpreter on the CPU, and not yet timed on a
  GPU, so float experts keep the grouped GEMM that was.

Under tensor parallelism (:mod:`dsr1.parallel.tensor`) an :class:`Experts` holds ``count`` whole
experts starting at ``first``; the (replicated) router still picks among all ``E``. The pairs routed
to another rank's experts weigh nothing here: they go to a sink id (``count``) that the reference and
grouped paths skip, and that the gathered and Triton paths clamp onto a local expert with weight 0
(they compute it and throw it away: no host sync). The rank's partial sums are all-reduced by
the caller.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.models.hf_fields import flag, integer, positive_number

#: (token, expert) pairs up to which a CUDA step runs quantized experts as matrix-vector products; past it
#: (long prefills) the stacks are dequantized for the grouped GEMM.
GEMV_MAX_PAIRS = 2048

#: how a router turns scores into the top-k experts (the ``topk_method`` of DeepSeek's configs):
#: ``greedy`` softmax then top-k (Qwen3-MoE, DeepSeek-V2-Lite); ``group_limited_greedy`` only from the
#: ``topk_group`` groups with the highest expert score (DeepSeek-V2); ``noaux_tc`` sigmoid scores plus a
#: load-balancing bias, groups ranked by their two best experts (DeepSeek-V3/R1).
ROUTINGS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoEArgs:
    n_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    routing: Literal["greedy", "group_limited_greedy", "noaux_tc"]
    n_group: int
    topk_group: int
    #: renormalise the k chosen weights to sum to 1
    norm_topk_prob: bool
    #: multiplies the routed experts' weights (DeepSeek)
    routed_scaling_factor: float
    #: router logits in fp32 with an fp32 gate weight (DeepSeek keeps the gate in fp32)
    router_fp32: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any], routing: str, router_fp32: bool) -> MoEArgs:
        count = next((key for key in ("n_routed_experts", "num_experts", "num_local_experts") if hf.get(key)),
                     "n_routed_experts")
        e, k = integer(hf, count, 0, minimum=0), integer(hf, "num_experts_per_tok", 0, minimum=0)
        if e < 1 or not 1 <= k <= e:
            raise Dsr1Error(f"config.json: num_experts_per_tok {k} must be between 1 and the expert count {e}")
        if routing not in ROUTINGS:
            raise Dsr1Error(f"config.json: topk_method {routing!r} is not supported; supported: {', '.join(ROUTINGS)}")
        groups = integer(hf, "n_group", 1) if routing != "greedy" else 1
        topk_group = integer(hf, "topk_group", groups) if routing != "greedy" else 1
        if e % groups or not 1 <= topk_group <= groups:
            raise Dsr1Error(f"config.json: n_group {groups} must divide the {e} experts and topk_group {topk_group} "
                            f"must be between 1 and n_group")
        if routing == "noaux_tc" and e // groups < 2:
            raise Dsr1Error(f"config.json: noaux_tc routing ranks groups by their two best experts; n_group {groups} "
                            f"leaves {e // groups} expert per group")
        if topk_group * (e // groups) < k:
            raise Dsr1Error(f"config.json: topk_group {topk_group} groups of {e // groups} experts hold fewer than "
                            f"num_experts_per_tok {k}")
        return cls(
            n_experts=e, top_k=k, hidden_size=integer(hf, "hidden_size"),
            intermediate_size=integer(hf, "moe_intermediate_size", None) or integer(hf, "intermediate_size"),
            routing=routing,  # type: ignore[arg-type]  # checked against ROUTINGS above
            n_group=groups, topk_group=topk_group,
            norm_topk_prob=flag(hf, "norm_topk_prob", False),
            routed_scaling_factor=positive_number(hf, "routed_scaling_factor", 1.0),
            router_fp32=router_fp32,
        )


class Router(nn.Module):
    """Token → (weights ``(N, k)`` fp32, expert ids ``(N, k)``); see :data:`ROUTINGS`."""

    def __init__(self, a: MoEArgs) -> None:
        super().__init__()
        self.a = a
        #: quant policies leave an fp32 gate in fp32 (DeepSeek: its scores pick the experts)
        self.keeps_dtype = a.router_fp32
        self.weight = nn.Parameter(torch.empty(a.n_experts, a.hidden_size))
        if a.routing == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(a.n_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a
        if a.router_fp32:
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        else:
            logits = F.linear(x, self.weight)  # (N, E) in the model dtype, as Qwen3-MoE
        if a.routing == "noaux_tc":
            scores = logits.sigmoid()
            choice = self._limit_groups(scores + self.e_score_correction_bias.float(), float("-inf"))
            ids = choice.topk(a.top_k, dim=-1, sorted=False)[1]  # (N, k)
            weights = scores.gather(1, ids)  # the bias picks experts but does not weigh them
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)  # (N, E)
            if a.routing == "group_limited_greedy":
                scores = self._limit_groups(scores, 0.0)
            weights, ids = scores.topk(a.top_k, dim=-1, sorted=False)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if not a.router_fp32:
            weights = weights.to(logits.dtype)  # Qwen3-MoE rounds the weights to the model dtype
        return weights * a.routed_scaling_factor, ids

    def _limit_groups(self, scores: torch.Tensor, fill: float) -> torch.Tensor:
        """``scores`` ``(N, E)`` with every expert outside the ``topk_group`` best groups set to ``fill``."""
        a = self.a
        if a.n_group == 1:
            return scores
        grouped = scores.view(-1, a.n_group, a.n_experts // a.n_group)  # (N, G, E/G)
        if a.routing == "noaux_tc":
            group_score = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G): sum of each group's two best
        else:
            group_score = grouped.max(dim=-1).values  # (N, G)
        best = group_score.topk(a.topk_group, dim=-1, sorted=False)[1]  # (N, topk_group)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep[..., None], fill).view_as(scores)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x``'s dtype on its device (CPU: any float; CUDA: bf16, sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and _capability(x.device.index or 0) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class Experts(nn.Module):
    """``E`` SwiGLU experts, stacked; ``forward(x, weights, ids)`` → ``(N, C)``."""

    #: what quant policies and the precision map recognise (they see no ``nn.Linear`` here)
    stacked_experts = True

    def __init__(self, a: MoEArgs, grouped: bool, first: int = 0, count: int | None = None) -> None:
        super().__init__()
        #: this module's experts are ``[first, first + n)`` of the router's ``total`` (all of them but under
        #: tensor parallelism)
        self.n = a.n_experts if count is None else count
        self.first, self.total = first, a.n_experts
        self.f, self.grouped = a.intermediate_size, grouped
        self.gate_up_proj = nn.Parameter(torch.empty(self.n, 2 * a.intermediate_size, a.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.n, a.hidden_size, a.intermediate_size))
        #: weight-only quantized (:meth:`quantize_`): ``{name}_q`` (int8 or fp8) and ``{name}_scale`` per output row
        self.quantized = False

    def quantize_(self, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Weight-only quantization: every expert's rows through ``quantize`` (``(rows, in)`` → int8 or fp8
        ``(rows, in)`` and scales ``(rows,)``: a quant policy's scheme); the floating-point stacks are dropped."""
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name).detach()  # (E, N, K)
            e, n, k = w.shape
            q, scale = quantize(w.reshape(e * n, k))
            delattr(self, name)
            self.register_buffer(f"{name}_q", q.view(e, n, k))
            self.register_buffer(f"{name}_scale", scale.view(e, n))
        self.quantized = True

    def weight(self, name: str, dtype: torch.dtype, e: int | None = None) -> torch.Tensor:
        """Expert ``e``'s weight (None: the whole stack) of ``name`` in ``dtype`` (dequantized if quantized)."""
        if not self.quantized:
            w = getattr(self, name)
            return w if e is None else w[e]
        q, scale = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        if e is not None:
            q, scale = q[e], scale[e]
        return (q.float() * scale.float()[..., None]).to(dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.n < self.total:  # expert parallelism: another rank's pairs go to the sink id n, weight 0
            ids = ids - self.first
            foreign = (ids < 0) | (ids >= self.n)  # (N, k)
            ids, weights = ids.masked_fill(foreign, self.n), weights.masked_fill(foreign, 0)
        # quantized on CUDA: the kernel reads the quantized rows (dequantizing whole stacks per step costs more)
        if self.quantized and self.grouped and x.is_cuda and ids.numel() <= GEMV_MAX_PAIRS and _triton():
            return self.forward_gemv(x, weights, ids)
        if self.quantized and x.device.type == "cpu":
            return self.reference(x, weights, ids)  # only the experts that got tokens are dequantized
        if self.grouped and grouped_mm_supported(x):
            return self.forward_grouped(x, weights, ids)
        if self.grouped and x.device.type != "cpu":  # no host sync either (a CUDA graph can capture it)
            return self.forward_gathered(x, weights, ids)
        return self.reference(x, weights, ids)

    def reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Expert by expert over the tokens routed to it, as transformers does."""
        out = torch.zeros_like(x)  # (N, C)
        hit = torch.zeros(self.n + 1, dtype=torch.bool, device=ids.device).scatter_(0, ids.flatten(), True)
        for e in hit[: self.n].nonzero().flatten().tolist():  # (the sink n: pairs another rank computes)
            token, slot = torch.where(ids == e)  # (n_e,) each
            gate, up = F.linear(x[token], self.weight("gate_up_proj", x.dtype, e)).chunk(2, dim=-1)  # 2 × (n_e, F)
            y = F.linear(F.silu(gate) * up, self.weight("down_proj", x.dtype, e))  # (n_e, C)
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sorted by expert, each projection one grouped GEMM; group ends computed on the device."""
        n, k = ids.shape
        sharded = self.n < self.total  # the sink group n sorts last and is left out of the GEMMs
        flat = ids.flatten()
        order, ends = sort_by_expert(flat, self.n + sharded)  # (N·k,) pairs grouped by expert; (E,) group ends
        ends = ends[: self.n]
        token = order // k  # (N·k,) the token of each sorted pair
        w13, w2 = self.weight("gate_up_proj", x.dtype), self.weight("down_proj", x.dtype)
        gate_up = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=ends)  # (N·k, 2F)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up  # (N·k, F)
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=ends)  # (N·k, C)
        y = y * weights.flatten()[order, None]  # fp32 weights: the product is fp32, as in the reference
        if sharded:  # the sink's rows past the last group end hold whatever memory was there
            y = torch.where((flat[order] < self.n)[:, None], y, 0.0)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # (N, C)

    def forward_gemv(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair as matrix-vector products over its expert's (quantized) weights (Triton)."""
        from dsr1.models.moe_triton import moe_gemv

        n, k = ids.shape
        flat = ids.flatten().clamp(max=self.n - 1)  # (N·k,); the sink (weight 0) onto a local expert
        xs = x.repeat_interleave(k, dim=0)  # (N·k, C): pair i is token i // k
        if self.quantized:
            gate, up = moe_gemv(xs, flat, self.gate_up_proj_q, self.gate_up_proj_scale).chunk(2, dim=-1)
            y = moe_gemv(F.silu(gate) * up, flat, self.down_proj_q, self.down_proj_scale)  # (N·k, C)
        else:
            gate, up = moe_gemv(xs, flat, self.gate_up_proj, None).chunk(2, dim=-1)  # 2 × (N·k, F)
            y = moe_gemv(F.silu(gate) * up, flat, self.down_proj, None)  # (N·k, C)
        return (y * weights.flatten()[:, None]).view(n, k, -1).sum(dim=1).to(x.dtype)  # (N, C)

    def forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair against a gathered copy of its expert's weights: no host sync and any
        dtype, but it copies the chosen experts' weights (the path where grouped GEMMs do not run)."""
        n, k = ids.shape
        flat = ids.flatten().clamp(max=self.n - 1)  # (N·k,); the sink (weight 0) onto a local expert
        xs = x.repeat_interleave(k, dim=0)[:, :, None]  # (N·k, C, 1)
        w13, w2 = self.weight("gate_up_proj", x.dtype), self.weight("down_proj", x.dtype)
        gate, up = torch.bmm(w13[flat], xs)[..., 0].chunk(2, dim=-1)  # 2 × (N·k, F)
        y = torch.bmm(w2[flat], (F.silu(gate) * up)[:, :, None])[..., 0]  # (N·k, C)
        return (y * weights.flatten()[:, None]).view(n, k, -1).sum(dim=1).to(x.dtype)  # (N, C)


def sort_by_expert(flat: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' order grouped by expert (stable) ``(P,)`` and each expert's end row ``(E,)`` int32."""
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # (E,)
    return flat.argsort(stable=True), counts.cumsum(0, dtype=torch.int32)


def _triton() -> bool:
    from dsr1.models.moe_triton import available

    return available()


class SparseMoE(nn.Module):
    """Router + experts (+ DeepSeek's always-on shared experts, a plain SwiGLU MLP)."""

    def __init__(self, a: MoEArgs, grouped: bool, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = Router(a)
        self.experts = Experts(a, grouped)
        if shared is not None:
            self.shared_experts = shared
        self.has_shared = shared is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        weights, ids = self.gate(flat)
        out = self.experts(flat, weights, ids).view(shape)
        if self.has_shared:
            out = out + self.shared_experts(x)
        return out


def expert_sources(prefix: str, n_experts: int) -> dict[str, tuple[list[str], str]]:
    """Stacked parameter → (the checkpoint tensors it is built from, how): ``gate_up`` stacks each expert's
    gate and up projections concatenated, ``down`` stacks the down projections."""
    p = f"{prefix}experts."
    return {
        p + "gate_up_proj": ([f"{p}{e}.{w}_proj.weight" for e in range(n_experts) for w in ("gate", "up")], "gate_up"),
        p + "down_proj": ([f"{p}{e}.down_proj.weight" for e in range(n_experts)], "down"),
    }


def stack_experts(parts: list[torch.Tensor], how: str) -> torch.Tensor:
    """Checkpoint tensors in :func:`expert_sources` order → the stacked parameter. Under tensor parallelism
    the experts another rank holds are read as empty slices (no bytes read) and left out here."""
    parts = [p for p in parts if p.numel()]
    if how == "gate_up":
        return torch.stack([torch.cat(parts[i : i + 2], dim=0) for i in range(0, len(parts), 2)])  # (E, 2F, C)
    return torch.stack(parts)  # (E, C, F)


def unstack_experts(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A stacked parameter → the checkpoint's per-expert tensors (for ``hf_state_dict``)."""
    if name.endswith(("_q", "_scale")):
        raise Dsr1Error("saving a model whose MoE experts are quantized is not supported; save it unquantized "
                        "and pick the quant policy when loading")
    p = name.rsplit("experts.", 1)[0] + "experts."
    if name.endswith("gate_up_proj"):
        out = []
        for e, w in enumerate(t):
            gate, up = w.chunk(2, dim=0)
            out += [(f"{p}{e}.gate_proj.weight", gate), (f"{p}{e}.up_proj.weight", up)]
        return out
    return [(f"{p}{e}.down_proj.weight", w) for e, w in enumerate(t)]

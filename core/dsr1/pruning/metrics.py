"""What a pruning stage is judged by: parameters and sparsity, held-out accuracy, file size.

Sparsity is counted over the *prunable* linear layers (every ``nn.Linear`` except the output
head and weights tied to an embedding): ``1 - nonzero / original numel``, so a weight that was
zeroed (unstructured, 2:4) and a row that was physically removed (structured) count the same.

Accuracy:

* causal LM: token-level perplexity in non-overlapping windows, each scored on its own
  (the rule of ``tools/train_tiny.py``), and ``score = dense perplexity / perplexity``;
* encoder: fidelity of sentence embeddings to the dense model's: mean cosine of each
  sentence's pair, and the Spearman correlation of all pairwise similarities (``score`` is
  the mean cosine).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def prunable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """The linear layers sparsity is counted over, in module order."""
    from dsr1.models.packing import refuse_packed

    refuse_packed(model, "prune")
    skip = tuple(skip)
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not any(name == s or name.endswith("." + s) for s in skip)
        and m.weight.data_ptr() not in embedded
    ]


@dataclass(frozen=True)
class LayerShape:
    """A prunable layer's weight shape before any pruning."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def original_shapes(model: nn.Module) -> list[LayerShape]:
    """The prunable layers of the dense model, recorded before the first stage."""
    return [LayerShape(name, tuple(m.weight.shape)) for name, m in prunable_linears(model)]


def prunable_numel(model: nn.Module) -> int:
    """Elements of the prunable weights as they are now (smaller after structured pruning)."""
    return sum(m.weight.numel() for _, m in prunable_linears(model))


def census(model: nn.Module, original: list[LayerShape]) -> dict[str, Any]:
    """Realized sparsity overall and per layer against the dense shapes, and parameter counts."""
    modules = dict(model.named_modules())
    per_layer: dict[str, dict[str, Any]] = {}
    kept = total = 0
    for layer in original:
        m = modules.get(layer.name)
        w = getattr(m, "weight", None)
        nonzero = int(torch.count_nonzero(w).item()) if isinstance(w, torch.Tensor) else 0
        shape = list(w.shape) if isinstance(w, torch.Tensor) else [0, 0]
        per_layer[layer.name] = {
            "shape": shape,
            "dense_shape": list(layer.shape),
            "sparsity": round(1.0 - nonzero / layer.numel, 6),
        }
        kept += nonzero
        total += layer.numel
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "realized_sparsity": round(1.0 - kept / total, 6) if total else 0.0,
        "prunable_dense": total,
        "prunable_nonzero": kept,
        "parameters": sum(p.numel() for p in params),
        "parameters_nonzero": int(sum(int(torch.count_nonzero(p).item()) for p in params)),
        "per_layer": per_layer,
    }


def dir_bytes(path: Path) -> int:
    """Bytes of the weight files of a saved model dir."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --- accuracy ---------------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model: nn.Module, stream: torch.Tensor, window: int) -> float:
    """Perplexity of ``stream`` ``(N,)`` in non-overlapping ``window``-token windows."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, stream.numel(), window):
        chunk = stream[start : start + window][None].to(device)  # (1, T)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits.float()  # (1, T, V)
        nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def sentence_embeddings(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized mean-pooled embeddings ``(N, C)`` in fp32 on the CPU."""
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
        chunks.append(model(**enc.to(device)).sentence_embedding.float().cpu())  # (b, C)
    return torch.cat(chunks)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` ``(N,)``, float64; tied values share the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # (G,) last 1-based rank of each run of equal values
    ranks = torch.empty(x.shape[0], dtype=torch.float64)
    ranks[order] = (ends - (counts.double() - 1) / 2)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` ``(N,)``: Pearson's of their average ranks
    (what ``scipy.stats.spearmanr`` computes; NaN when either side is constant)."""
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def embedding_fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Mean / min cosine of each sentence with its dense embedding, and the Spearman correlation
    of the pairwise cosine similarities (upper triangle) of the two sets."""
    cos = F.cosine_similarity(dense.double(), pruned.double(), dim=1)  # (N,)
    d, p = F.normalize(dense.double(), dim=1), F.normalize(pruned.double(), dim=1)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    sim_d = (d @ d.T)[iu[0], iu[1]]  # (N(N-1)/2,)
    sim_p = (p @ p.T)[iu[0], iu[1]]
    rho = spearman(sim_d, sim_p) if sim_d.numel() > 1 else 1.0
    return {
        "mean_cosine": round(float(cos.mean()), 6),
        "min_cosine": round(float(cos.min()), 6),
        "spearman": round(rho, 6),
    }

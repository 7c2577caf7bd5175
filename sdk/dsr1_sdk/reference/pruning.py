"""Reference pruning masks: a full sort, then keep everything after the ``k`` smallest.

``k = round(sparsity · numel)`` weights are pruned. Ties at the threshold are broken by
flat index (the earlier element is pruned first), so the realized sparsity is exactly
``k / numel`` and the mask is a pure function of the scores.
"""
from __future__ import annotations

import torch


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` target prunes."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(numel, int(round(sparsity * numel)))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask: ``False`` on the ``k`` lowest ``scores`` (ties: lower index first)."""
    flat = scores.detach().reshape(-1).to("cpu", torch.float64)  # (N,)
    k = n_pruned(flat.numel(), sparsity)
    order = torch.sort(flat, stable=True).indices  # (N,), ascending, ties by index
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape).to(scores.device)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude pruning: prune the ``k`` smallest ``|w|``."""
    return topk_mask(weight.abs(), sparsity)


def sparsity(mask: torch.Tensor) -> float:
    """Fraction of ``False`` in a keep-mask (or of zeros in a weight)."""
    if mask.dtype == torch.bool:
        return 1.0 - mask.float().mean().item()
    return (mask == 0).float().mean().item()

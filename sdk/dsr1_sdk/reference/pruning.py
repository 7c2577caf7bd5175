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


def wanda_mask(weight: torch.Tensor, activation_norm: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score ``|W[i, j]| · ‖X_j‖``, weights compared within each output row.

    ``k = round(sparsity · numel)`` in all: ``k // rows`` per row, plus one in the ``k % rows`` rows
    whose next candidate (the ``k // rows``-th lowest score of the row) is lowest, ties by row index.
    Within a row, ties go by column index. Written row by row with full sorts.
    """
    scores = weight.detach().abs().to("cpu", torch.float64)  # (out, in)
    if activation_norm is not None:
        scores = scores * activation_norm.detach().to("cpu", torch.float64)[None, :]
    rows, cols = scores.shape
    k = n_pruned(rows * cols, sparsity)
    base, extra = divmod(k, rows)
    orders = [torch.sort(scores[r], stable=True).indices for r in range(rows)]  # ascending per row
    nxt = torch.tensor([float(scores[r, orders[r][base]]) if base < cols else float("inf") for r in range(rows)])
    bonus = set(torch.sort(nxt, stable=True).indices[:extra].tolist())
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        keep[r, orders[r][: base + (1 if r in bonus else 0)]] = False
    return keep.to(weight.device)


def semi_structured_mask(scores: torch.Tensor, sparsity: float, n: int = 2, m: int = 4) -> torch.Tensor:
    """``n:m`` sparsity: each group of ``m`` consecutive inputs of a row loses its ``n`` lowest scores
    (ties by index); above ``n/m`` the lowest remaining scores of the matrix go too (ties by flat index)."""
    s = scores.detach().to("cpu", torch.float64)  # (out, in)
    rows, cols = s.shape
    if cols % m:
        raise ValueError(f"input dim {cols} is not a multiple of {m}")
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if n_pruned(s.numel(), sparsity) == 0:
        return keep.to(scores.device)
    for r in range(rows):
        for g in range(0, cols, m):
            order = torch.sort(s[r, g : g + m], stable=True).indices
            keep[r, g + order[:n]] = False
    k = n_pruned(s.numel(), sparsity)
    extra = k - int((~keep).sum())
    if extra > 0:
        candidates = torch.where(keep, s, torch.full_like(s, float("inf"))).reshape(-1)
        order = torch.sort(candidates, stable=True).indices[:extra]
        keep.view(-1)[order] = False
    return keep.to(scores.device)


def groups_hold_zeros(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row holds at least ``n`` zeros."""
    rows, cols = weight.shape
    return all(
        int((weight[r, g : g + m] == 0).sum()) >= n for r in range(rows) for g in range(0, cols - cols % m, m)
    )

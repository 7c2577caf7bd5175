"""Keep-masks shared by the pruning strategies. ``True`` = keep; ties always go by index.

Every mask here prunes an exact count, breaks ties by the lowest (flat or in-row) index, and is
idempotent: re-pruning the pruned weight at the same sparsity prunes the same entries, because
they now score 0, the lowest possible score (scores are ≥ 0).
"""
from __future__ import annotations

import torch

from dsr1.errors import Dsr1Error


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise Dsr1Error(f"sparsity must be within [0, 1], got {sparsity}")


def wanda_score(weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Wanda's score ``|W[i, j]| · ‖X_j‖₂`` (Sun et al. 2023), fp32 ``(out, in)`` on the weight's device;
    ``|W|`` (magnitude) without an activation norm ``(in,)``."""
    s = weight.detach().abs().float()  # (out, in)
    if activation_norm is not None:
        s = s * activation_norm.detach().float().to(s.device)[None, :]  # (out, in) · (1, in)
    return s


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries ``sparsity`` prunes: ``round(sparsity · numel)``."""
    check_sparsity(sparsity)
    return min(numel, round(sparsity * numel))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest of ``scores`` (any shape), ties by lowest flat index."""
    flat = scores.reshape(-1)  # (N,)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices  # (N,) ascending, ties by index
        keep[order[:k]] = False
    return keep.reshape(scores.shape)


def row_balanced_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores`` ``(out, in)`` comparing weights only within each output row (Wanda).

    ``k = round(sparsity · numel)`` entries are pruned in all: ``k // out`` per row, and one more
    in the ``k % out`` rows whose next candidate scores lowest (ties: lower row index), so the
    realized sparsity is exact even when ``sparsity · in`` is not an integer.
    """
    if scores.dim() == 1:
        return row_balanced_mask(scores[None], sparsity)[0]
    rows, cols = scores.shape
    k = n_pruned(rows * cols, sparsity)
    base, extra = divmod(k, rows)
    values, order = torch.sort(scores, dim=1, stable=True)  # (out, in) ascending per row
    counts = torch.full((rows,), base, dtype=torch.long, device=scores.device)  # (out,)
    if extra:
        nxt = values[:, base]  # (out,) the next weight each row would lose
        counts[torch.sort(nxt, stable=True).indices[:extra]] += 1
    prune_sorted = torch.arange(cols, device=scores.device)[None, :] < counts[:, None]  # (out, in) in sorted order
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, ~prune_sorted)  # back to column order
    return keep


def n_m_mask(scores: torch.Tensor, sparsity: float, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with at least ``n`` of every ``m`` consecutive inputs pruned (2:4), plus more.

    ``scores`` ``(out, in)``, ``in % m == 0``. ``sparsity`` is 0 (keep all) or ≥ ``n / m``: each group
    of ``m`` loses its ``n`` lowest scores; beyond ``n / m`` the lowest remaining scores of the whole
    matrix go too (groups then hold more than ``n`` zeros, which sparse kernels accept).
    """
    check_sparsity(sparsity)
    rows, cols = scores.shape
    if cols % m:
        raise Dsr1Error(f"{n}:{m} sparsity needs an input dim that is a multiple of {m}; this weight has {cols}")
    if sparsity == 0.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if sparsity < n / m - 1e-9:
        raise Dsr1Error(f"{n}:{m} sparsity prunes at least {n / m:.0%} of a weight; {sparsity} is below that")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices  # (out, in/m, m) ascending within a group
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], False)
    keep = keep.reshape(rows, cols)
    k = n_pruned(rows * cols, sparsity)
    if k > rows * cols * n // m:
        forced = torch.where(keep, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
        keep = lowest_k_mask(forced, k)  # the forced -1 entries come first, then the lowest kept scores
    return keep

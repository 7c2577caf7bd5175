"""The pruning kit's new checks catch the bugs they are meant to catch."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from dsr1.interfaces import Pruner
from dsr1.pruning.masks import n_m_mask, row_balanced_mask
from dsr1_sdk.reference import magnitude_mask, semi_structured_mask, wanda_mask
from dsr1_sdk.testing.pruning import CASES, check_mask

WEIGHT, ACT = CASES["square_64"].make()


class RowWanda(Pruner):
    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs() * activation_norm[None, :]

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        return wanda_mask(weight, activation_norm, sparsity)


class GlobalClaimingPerRow(RowWanda):
    """A global top-k mask: rows lose different shares, and a row can keep a lower score."""

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        from dsr1_sdk.reference import topk_mask

        return topk_mask(self.score(weight, activation_norm), sparsity)


class InvertedRows(RowWanda):
    """Equal counts per row, but each row loses its highest scores."""

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        return row_balanced_mask(-self.score(weight, activation_norm), sparsity)


class WrongGroups(Pruner):
    """50% sparse, but by halves of each row: groups of 4 keep 4 or 0."""

    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs()

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        keep = torch.ones_like(weight, dtype=torch.bool)
        keep[:, : round(sparsity * weight.shape[1])] = False
        return keep


class Semi24(WrongGroups):
    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        return semi_structured_mask(weight.abs(), sparsity)


class ScatteredClaimingStructured(WrongGroups):
    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        return magnitude_mask(weight, sparsity)


def test_per_row_check() -> None:
    caps = frozenset({"per_row", "activation_aware"})
    check_mask(RowWanda(), WEIGHT, 0.5, ACT, caps)
    with pytest.raises(AssertionError, match="rows lose different shares"):
        check_mask(GlobalClaimingPerRow(), WEIGHT, 0.5, ACT, caps)
    with pytest.raises(AssertionError, match="row .* kept a score"):
        check_mask(InvertedRows(), WEIGHT, 0.5, ACT, caps)


def test_2_4_check() -> None:
    caps = frozenset({"2:4"})
    check_mask(Semi24(), WEIGHT, 0.5, None, caps)
    check_mask(Semi24(), WEIGHT, 0.7, None, caps)
    with pytest.raises(AssertionError, match="fewer than 2 zeros"):
        check_mask(WrongGroups(), WEIGHT, 0.5, None, caps)


def test_structured_check() -> None:
    caps = frozenset({"structured"})
    with pytest.raises(AssertionError, match="not whole input columns"):
        check_mask(ScatteredClaimingStructured(), WEIGHT, 0.5, None, caps)


def test_core_masks_equal_the_references() -> None:
    for target in (0.0, 0.3, 0.5, 0.77):
        assert torch.equal(row_balanced_mask(WEIGHT.abs() * ACT[None, :], target), wanda_mask(WEIGHT, ACT, target))
    for target in (0.0, 0.5, 0.77):
        assert torch.equal(n_m_mask(WEIGHT.abs(), target), semi_structured_mask(WEIGHT.abs(), target))

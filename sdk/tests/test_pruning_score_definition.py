"""The pruning kit checks ``score`` against the definition the plugin declares."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from dsr1.interfaces import Pruner
from dsr1_sdk.reference import topk_mask
from dsr1_sdk.testing.pruning import (
    CASES,
    SCORE_DEFINITIONS,
    PruningConformance,
    check_mask,
    check_score_definition,
    declared_score,
)


class Magnitude(Pruner):
    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs()

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: Any = None) -> torch.Tensor:
        return topk_mask(self.score(weight, activation_norm), sparsity)


class Squared(Magnitude):
    """|w|²: another number, the same ranking: passes."""

    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.square()


class ColumnWeighted(Magnitude):
    """Declares magnitude, favours late input columns: its mask agrees with its own score (and is
    idempotent, exactly sparse), so check_mask alone passes it."""

    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs() * torch.arange(1, weight.shape[-1] + 1, dtype=weight.dtype)[None, :]


class WandaWithoutActivations(Magnitude):
    """Declares activation_aware (wanda), ranks by |w| alone."""


class Wanda(Magnitude):
    def score(self, weight: torch.Tensor, activation_norm: Any = None) -> torch.Tensor:
        return weight.abs() * activation_norm[None, :]


def test_declared_definitions() -> None:
    assert declared_score(frozenset({"unstructured"})) == "magnitude"
    assert declared_score(frozenset({"activation_aware", "per_row"})) == "wanda"
    assert declared_score(frozenset({"activation_aware", "score:magnitude"})) == "magnitude"
    with pytest.raises(AssertionError, match="score:taylor names no definition"):
        declared_score(frozenset({"score:taylor"}))


@pytest.mark.parametrize("case", ["square_64", "many_ties", "with_zeros", "tiny_3x5"])
def test_right_scores_pass_wrong_ones_fail(case: str) -> None:
    weight, act = CASES[case].make()
    check_score_definition(Magnitude(), weight, None, SCORE_DEFINITIONS["magnitude"])
    check_score_definition(Squared(), weight, None, SCORE_DEFINITIONS["magnitude"])
    check_score_definition(Wanda(), weight, act, SCORE_DEFINITIONS["wanda"])
    caps = frozenset({"unstructured"})
    check_mask(ColumnWeighted(), weight, 0.5, None, caps)  # the old check: the mask agrees with its own score
    with pytest.raises(AssertionError, match="score ignores its definition"):
        check_score_definition(ColumnWeighted(), weight, None, SCORE_DEFINITIONS["magnitude"])
    with pytest.raises(AssertionError, match=r"score ignores its definition \(wanda\)"):
        check_score_definition(WandaWithoutActivations(), weight, act, SCORE_DEFINITIONS["wanda"], "wanda")


def test_a_test_class_can_declare_its_reference() -> None:
    def cubed(w: torch.Tensor, act: Any) -> torch.Tensor:
        return w.abs() ** 3

    class TestMine(PruningConformance):
        plugin = "mine"
        reference_score = cubed

    name, fn = TestMine().score_reference()
    assert fn is cubed and name == "TestMine.reference_score"


class TestMagnitudeScore(PruningConformance):
    """The builtin magnitude plugin declares no score: magnitude is implied, and it holds."""

    plugin = "magnitude"
    test_case = test_prune_model = test_saved_stage_reloads = None  # type: ignore[assignment]  # run by its package
    test_hypothesis_shapes_and_sparsities = test_import_starts_no_device_runtime = None  # type: ignore[assignment]

"""``wanda``: Pruning by Weights and activations (Sun et al. 2023, arXiv:2306.11695).

The score of weight ``W[i, j]`` of a linear layer is ``|W[i, j]| · ‖X_j‖₂``, where ``‖X_j‖₂`` is the
norm of input feature ``j`` over every calibration token. Scores are compared **within each
output row**: every row loses the same number of weights (``k // out``, and one more in the
``k % out`` rows whose next candidate scores lowest, so the total ``k = round(s · numel)`` is
exact). Ties go to the lower column index, so masks are idempotent.

With ``sequential`` (default) the model is pruned block by block: the activation norms of
block ``i`` are measured on the output of the already-pruned blocks before it, as in the paper's
code. Without calibration text ``prune_`` refuses; ``mask()`` without an activation norm is
per-row magnitude pruning.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from dsr1_sdk import Field, PluginSpec, Pruner, PruningOptions, hookimpl
from dsr1_sdk.pruning import (
    block_groups,
    check_sparsity,
    input_norms,
    prunable_linears,
    row_balanced_mask,
    usable_batches,
    wanda_score,
)

__all__ = ["WandaOptions", "WandaPruner", "dsr1_pruning"]


class WandaOptions(PruningOptions):
    """Options of the ``wanda`` pruner (at load: ``sparsity`` and ``calibration`` are required)."""

    sequential: bool = Field(True, description="prune block by block, measuring each block after the pruned ones")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name suffixes never pruned")


class WandaPruner(Pruner):
    """Wanda; see the module docstring."""

    Options = WandaOptions
    options: WandaOptions

    def score(self, weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return wanda_score(weight, activation_norm)  # (out, in)

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        check_sparsity(sparsity)
        return row_balanced_mask(self.score(weight, activation_norm), sparsity)  # (out, in) bool

    def needs_calibration(self) -> bool:
        return True  # the scores are |W|·‖X‖

    def prune_(
        self,
        model: torch.nn.Module,
        sparsity: float,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Zero the pruned weights of every prunable linear in place; returns keep-masks by name."""
        check_sparsity(sparsity)
        layers = prunable_linears(model, self.options.skip)
        if sparsity == 0.0:
            return {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in layers}
        batches = usable_batches(calibration, "wanda")
        groups = block_groups(layers) if self.options.sequential else [layers]
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for group in groups:
                norms = input_norms(model, group, batches)  # name → (in,)
                for name, module in group:
                    keep = self.mask(module.weight, sparsity, norms[name])
                    module.weight.masked_fill_(~keep, 0.0)
                    masks[name] = keep
        return masks


@hookimpl
def dsr1_pruning() -> PluginSpec:
    return PluginSpec(
        name="wanda",
        family="pruning",
        impl=WandaPruner,
        options=WandaOptions,
        capabilities=frozenset({"activation_aware", "per_row", "calibration"}),
        description="Wanda: |W|·‖X‖ scores from calibration activations, compared within each output row",
    )

"""``magnitude``: unstructured magnitude pruning with exact sparsity.

The score of a weight is ``|w|``. To prune a fraction ``s`` of ``n`` weights, exactly
``k = round(s · n)`` of them are zeroed: those below the k-th smallest score
(``torch.kthvalue``), then, among those equal to it, the ones with the lowest flat index
until ``k`` are pruned. Ties are therefore broken deterministically, the realized
sparsity is exactly ``k / n``, and the mask is idempotent: pruning the pruned weight again
at the same sparsity prunes the same entries (they are now the ``k`` zeros).

``scope="layer"`` prunes each linear layer to ``s``; ``scope="global"`` ranks the weights
of all prunable layers together, so layers with small weights lose more of them.
``prune_`` never touches embeddings, modules whose name ends with an entry of ``skip``
(``lm_head`` by default), or a linear whose weight is tied to an embedding.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from dsr1_sdk import Dsr1Error, Field, PluginSpec, Pruner, PruningOptions, hookimpl

__all__ = ["MagnitudeOptions", "MagnitudePruner", "dsr1_pruning", "exact_keep_mask"]


class MagnitudeOptions(PruningOptions):
    """Options of the ``magnitude`` pruner (``sparsity`` has no default: an engine config sets it)."""

    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer, or one for all")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name suffixes never pruned")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise Dsr1Error(f"sparsity must be within [0, 1], got {sparsity}")


def exact_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask pruning exactly ``round(sparsity · numel)`` lowest scores (ties: lowest index)."""
    _check_sparsity(sparsity)
    flat = scores.reshape(-1)  # (N,)
    n = flat.numel()
    k = min(n, int(round(sparsity * n)))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == n:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values  # the k-th smallest score
    prune = flat < threshold  # (N,) strictly below: always pruned
    ties = (flat == threshold).nonzero().squeeze(1)  # (n_ties,) ascending flat indices
    prune[ties[: k - int(prune.sum())]] = True
    return ~prune.reshape(scores.shape)


class MagnitudePruner(Pruner):
    """Unstructured magnitude pruning; see the module docstring."""

    Options = MagnitudeOptions
    options: MagnitudeOptions

    def score(self, weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return weight.detach().abs().float()  # (out, in)

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return exact_keep_mask(self.score(weight), sparsity)  # (out, in) bool

    def prunable(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
        """The linear layers ``prune_`` works on, in module order."""
        embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        return [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not any(name == s or name.endswith("." + s) for s in self.options.skip)
            and module.weight.data_ptr() not in embedded
        ]

    def prune_(
        self,
        model: torch.nn.Module,
        sparsity: float,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Zero the pruned weights in place; returns the keep-masks by module name."""
        _check_sparsity(sparsity)
        layers = self.prunable(model)
        if self.options.scope == "global" and layers:
            scores = torch.cat([self.score(m.weight).reshape(-1).cpu() for _, m in layers])  # (sum N,)
            sizes = [m.weight.numel() for _, m in layers]
            keep_all = torch.split(exact_keep_mask(scores, sparsity), sizes)  # one flat mask per layer
            masks = {
                name: keep.reshape(module.weight.shape).to(module.weight.device)
                for (name, module), keep in zip(layers, keep_all, strict=True)
            }
        else:
            masks = {name: self.mask(module.weight, sparsity) for name, module in layers}
        with torch.no_grad():
            for name, module in layers:
                module.weight.masked_fill_(~masks[name], 0.0)
        return masks


@hookimpl
def dsr1_pruning() -> PluginSpec:
    return PluginSpec(
        name="magnitude",
        family="pruning",
        impl=MagnitudePruner,
        options=MagnitudeOptions,
        capabilities=frozenset({"unstructured", "global"}),
        description="unstructured magnitude pruning, per layer or global, with exact sparsity",
    )

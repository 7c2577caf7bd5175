"""``semi24``: 2:4 semi-structured sparsity, the pattern NVIDIA sparse tensor cores run.

Every group of 4 consecutive inputs of each output row (``W[i, 4g:4g+4]``) loses its 2 lowest
scores, so a weight is exactly 50% sparse and ``torch.sparse.to_sparse_semi_structured`` can
compress it. Scores are ``|W|`` (``score="magnitude"``) or ``|W| · ‖X_j‖₂`` from calibration
activations (``score="wanda"``). A target above 0.5 also prunes the lowest remaining scores of
the whole matrix (groups then hold more than 2 zeros, which the kernels accept); a target in
(0, 0.5) is refused: 2:4 cannot be less than half sparse. A layer whose input dim is not a
multiple of 4 is left dense and listed in ``skipped`` (and in ``dsr1 prune``'s report).

Where the speed comes from: on CUDA, with fp16/bf16 weights, loading a saved stage with
``pruning: semi24`` in the engine config converts each 2:4 linear weight to a
``SparseSemiStructuredTensor`` (the ``dsr1_model_loaded`` hook below). Everywhere else the
weights stay dense with zeros: same size, same speed as dense. ``pruning: semi24`` also
prunes at load (``sparsity`` 0.5 by default): a dense checkpoint becomes 2:4 first, and a saved
2:4 stage is left as it is (its zeros are the lowest scores of every group).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from dsr1_sdk import Field, PluginSpec, Pruner, PruningOptions, hookimpl
from dsr1_sdk.pruning import (
    block_groups,
    check_sparsity,
    input_norms,
    n_m_mask,
    prunable_linears,
    usable_batches,
    wanda_score,
)

__all__ = ["Semi24Options", "Semi24Pruner", "dsr1_pruning", "is_2_4", "to_sparse_semi_structured_"]

GROUP, ZEROS = 4, 2


class Semi24Options(PruningOptions):
    """Options of the ``semi24`` pruner. At load ``sparsity`` defaults to 0.5, what 2:4 is (a
    checkpoint saved 2:4 is left as it is: pruning it again at 0.5 prunes its zeros)."""

    sparsity: float | None = Field(0.5, ge=0.0, lt=1.0, description="fraction of prunable weights zeroed at load")

    score: Literal["magnitude", "wanda"] = Field("magnitude", description="|W|, or |W|·‖X‖ from calibration text")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name suffixes never pruned")
    cuda_kernels: bool = Field(True, description="on CUDA, convert 2:4 weights to sparse tensor-core format at load")


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    rows, cols = weight.shape
    if cols % GROUP:
        return False
    zeros = (weight.reshape(rows, cols // GROUP, GROUP) == 0).sum(-1)  # (out, in/4)
    return bool((zeros >= ZEROS).all())


def to_sparse_semi_structured_(model: torch.nn.Module) -> dict[str, str]:
    """Convert every 2:4 fp16/bf16 CUDA linear weight for sparse tensor cores, in place.

    Returns layer name → ``"converted"`` or the reason it was not (not CUDA, dtype, not 2:4, a
    shape the kernels refuse). Needs torch ≥ 2.1 and an Ampere-or-newer GPU.
    """
    from torch.sparse import to_sparse_semi_structured

    result: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        if not w.is_cuda:
            result[name] = f"on {w.device.type}, not CUDA"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            result[name] = f"dtype {w.dtype} (sparse tensor cores take fp16/bf16)"
        elif not is_2_4(w.detach()):
            result[name] = "not 2:4 sparse"
        else:
            try:
                sparse = to_sparse_semi_structured(w.detach().contiguous())
            except (RuntimeError, ValueError) as err:  # shape below the kernels' minimum, no cuSPARSELt/CUTLASS
                result[name] = f"refused by to_sparse_semi_structured: {str(err).splitlines()[0]}"
                continue
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
            result[name] = "converted"
    return result


class Semi24Pruner(Pruner):
    """2:4 pruning; see the module docstring."""

    Options = Semi24Options
    options: Semi24Options

    def score(self, weight: torch.Tensor, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return wanda_score(weight, activation_norm if self.options.score == "wanda" else None)  # (out, in)

    def mask(self, weight: torch.Tensor, sparsity: float, activation_norm: torch.Tensor | None = None) -> torch.Tensor:
        return n_m_mask(self.score(weight, activation_norm), sparsity, ZEROS, GROUP)  # (out, in) bool

    def needs_calibration(self) -> bool:
        return self.options.score == "wanda"

    def prune_(
        self,
        model: torch.nn.Module,
        sparsity: float,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Zero the pruned weights in place; returns keep-masks of the layers it pruned."""
        check_sparsity(sparsity)
        self.skipped = {}
        layers: list[tuple[str, torch.nn.Linear]] = []
        for name, module in prunable_linears(model, self.options.skip):
            cols = module.weight.shape[1]
            if cols % GROUP:
                self.skipped[name] = f"input dim {cols} is not a multiple of {GROUP}: left dense"
            else:
                layers.append((name, module))
        if sparsity == 0.0:
            return {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in layers}
        wanda = self.options.score == "wanda"
        batches = usable_batches(calibration, "semi24 with score='wanda'") if wanda else []
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for group in block_groups(layers) if wanda else [layers]:
                norms = input_norms(model, group, batches) if wanda else {}
                for name, module in group:
                    keep = self.mask(module.weight, sparsity, norms.get(name))
                    module.weight.masked_fill_(~keep, 0.0)
                    masks[name] = keep
        return masks

    def report_notes(self, device: str) -> list[str]:
        """What ``dsr1 prune`` should say about speed on ``device``."""
        if device == "cuda" and self.options.cuda_kernels:
            return [("2:4 linear weights (fp16/bf16) are converted with torch.sparse.to_sparse_semi_structured when "
                     "a stage is loaded with pruning: semi24 (the speed column measures that)")]
        return [(f"on {device} 2:4 weights stay dense with zeros: same file size and the same speed as dense; the "
                 "sparse tensor-core path (torch.sparse.to_sparse_semi_structured) runs only on CUDA with fp16/bf16 "
                 "and was not measured in this run")]


@hookimpl
def dsr1_model_loaded(model: Any, config: Any) -> None:
    """With ``pruning: semi24`` in the engine config, convert 2:4 CUDA weights for sparse tensor cores."""
    choice = config.choice("pruning") if hasattr(config, "choice") else None
    if choice is None or choice.name != "semi24":
        return
    options = Semi24Options.model_validate(choice.options)
    device = next(model.parameters()).device
    if options.cuda_kernels and device.type == "cuda":
        model.semi24_conversion = to_sparse_semi_structured_(model)


@hookimpl
def dsr1_pruning() -> PluginSpec:
    return PluginSpec(
        name="semi24",
        family="pruning",
        impl=Semi24Pruner,
        options=Semi24Options,
        capabilities=frozenset({"2:4", "min_sparsity:0.5"}),
        description="2:4 semi-structured sparsity (magnitude or Wanda scores); sparse tensor cores on CUDA",
    )

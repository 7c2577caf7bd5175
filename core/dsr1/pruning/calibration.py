"""Activation statistics from calibration text, for activation-aware strategies (Wanda, 2:4-wanda,
structured importance).

:func:`input_norms` runs the model over the calibration batches with a forward pre-hook on each
requested linear layer and returns ``‖X_j‖₂`` per input feature ``j`` over every calibration
token (the Wanda paper's activation norm). :func:`block_groups` splits layers by transformer
block (``...layers.3.``, ``...layer.3.``) so a strategy can prune block by block, recomputing the
statistics of block ``i`` on the output of the already-pruned blocks ``< i``, as Sun et al. do.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from dsr1.errors import Dsr1Error

M = TypeVar("M", bound=nn.Module)

_BLOCK = re.compile(r"^(.*?\b(?:layers|layer|blocks|block|h)\.\d+)(?:\.|$)")


def block_groups(layers: Sequence[tuple[str, M]]) -> list[list[tuple[str, M]]]:
    """``layers`` grouped by transformer block in order of first appearance; layers outside any
    block (a pooler, a projection) form one last group."""
    groups: dict[str, list[tuple[str, M]]] = {}
    rest: list[tuple[str, M]] = []
    for name, module in layers:
        m = _BLOCK.match(name)
        if m is None:
            rest.append((name, module))
        else:
            groups.setdefault(m.group(1), []).append((name, module))
    return [*groups.values(), *([rest] if rest else [])]


def usable_batches(calibration: Iterable[torch.Tensor] | None, who: str) -> list[torch.Tensor]:
    """The calibration id tensors, or a one-line error when there are none."""
    batches = [b for b in (calibration or []) if isinstance(b, torch.Tensor) and b.numel() > 0]
    if not batches:
        raise Dsr1Error(f"{who} needs calibration text (token id batches); none was given or all were empty; "
                        f"pass --calibration FILE with some text, or leave it unset for the default text")
    return batches


@torch.no_grad()
def input_norms(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], calibration: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every input feature of each layer over all calibration tokens: name → ``(in,)`` fp32."""
    sq: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Any:
        def pre(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            total = x.pow(2).sum(0)  # (in,)
            sq[name] = sq[name] + total if name in sq else total

        return pre

    for name, module in layers:
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        for ids in calibration:
            model(ids.to(device))
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in layers if name not in sq]
    if missing:
        raise Dsr1Error(f"calibration never reached layer(s) {', '.join(missing[:3])}; the model's forward must use them")
    return {name: v.sqrt() for name, v in sq.items()}

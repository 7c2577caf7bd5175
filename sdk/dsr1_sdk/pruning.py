"""What ``dsr1.pruning`` plugins share: keep-masks, calibration statistics, the prunable layers.

Stable API (SDK API version 1, :data:`dsr1_sdk.API_VERSION`): every name in ``__all__`` keeps
its name, signature and meaning while the API version stays; a change that would break a plugin
comes with a new API version. The implementations live in the core (``dsr1.pruning``), whose
module layout is not an API: import these names from here, never from ``dsr1.*``.

* Masks (``True`` = keep; exact counts, ties broken by the lowest index, idempotent):
  :func:`check_sparsity`, :func:`n_pruned`, :func:`wanda_score` (``|W| · ‖X‖``, or ``|W|``
  without activation norms), :func:`lowest_k_mask`, :func:`row_balanced_mask` and
  :func:`n_m_mask` (N:M, 2:4 by default).
* Calibration, for activation-aware strategies: :func:`usable_batches` (refuses missing or
  empty calibration text with one line), :func:`input_norms` (``‖X_j‖₂`` per input feature of
  each requested linear layer) and :func:`block_groups` (layers split by transformer block, to
  prune block by block on the output of the already-pruned blocks).
* :func:`prunable_linears`: the ``(name, nn.Linear)`` pairs a strategy prunes (every linear
  layer except the output head and weights tied to an embedding; refuses packed models), the
  same set the sparsity of ``dsr1 prune`` is counted over.

The family base :class:`~dsr1_sdk.Pruner` and :class:`~dsr1_sdk.PruningOptions` are in
``dsr1_sdk``. This module imports torch; ``import dsr1_sdk`` does not.
"""
from __future__ import annotations

from dsr1.pruning.calibration import block_groups, input_norms, usable_batches
from dsr1.pruning.masks import check_sparsity, lowest_k_mask, n_m_mask, n_pruned, row_balanced_mask, wanda_score
from dsr1.pruning.metrics import prunable_linears

__all__ = [
    "block_groups",
    "check_sparsity",
    "input_norms",
    "lowest_k_mask",
    "n_m_mask",
    "n_pruned",
    "prunable_linears",
    "row_balanced_mask",
    "usable_batches",
    "wanda_score",
]

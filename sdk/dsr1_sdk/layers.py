"""Layer bases a plugin builds on: :class:`PackedLinear`, a linear layer in a kernel's own layout.

Stable API (SDK API version 1, :data:`dsr1_sdk.API_VERSION`): every name in ``__all__`` keeps
its name and meaning while the API version stays. The implementation lives in the core
(``dsr1.models.packing``), whose module layout is not an API: import it from here.

A device's ``pack_linear`` returns a :class:`PackedLinear` (the cpu device's ``PanelLinear``):
the subclass sets ``in_features``, ``out_features`` and ``bias`` (a plain parameter or ``None``)
and implements ``dense_weight()``, the plain ``(out, in)`` weight. ``state_dict()`` and
``save_pretrained`` then give plain weights, and quantization and pruning refuse a model that
holds one (they rewrite ``nn.Linear`` layers and would pass it by).

This module imports torch; ``import dsr1_sdk`` does not.
"""
from __future__ import annotations

from dsr1.models.packing import PackedLinear

__all__ = ["PackedLinear"]

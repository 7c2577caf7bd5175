"""Slow, obviously correct reference implementations: the oracles of the conformance kit.

One file per family. Each function favours clarity over speed (explicit float64 math,
full sorts instead of selection algorithms) and is small enough to check by reading.

* :mod:`.attention` - softmax attention with GQA, boolean masks and causal alignment.
* :mod:`.linear_attention` - causal linear attention (φ(q)·φ(k) kernel), the quadratic form.
* :mod:`.device` - the CPU semantics every device is compared with.
* :mod:`.quant` - symmetric per-channel integer fake-quant, plain casts, SQNR.
* :mod:`.pruning` - top-k masks from scores, magnitude, Wanda and n:m masks, sparsity.
"""
from __future__ import annotations

from dsr1_sdk.reference.attention import (
    attended_rows,
    causal_mask,
    repeat_kv,
    sliding_window_mask,
    softmax_attention,
)
from dsr1_sdk.reference.device import CpuReferenceDevice, matmul
from dsr1_sdk.reference.linear_attention import linear_attention
from dsr1_sdk.reference.pruning import (
    groups_hold_zeros,
    magnitude_mask,
    semi_structured_mask,
    sparsity,
    topk_mask,
    wanda_mask,
)
from dsr1_sdk.reference.quant import cast_error_bound, cast_round_trip, fake_quant_per_channel, int_error_bound, sqnr

__all__ = [
    "CpuReferenceDevice",
    "attended_rows",
    "cast_error_bound",
    "cast_round_trip",
    "causal_mask",
    "fake_quant_per_channel",
    "groups_hold_zeros",
    "int_error_bound",
    "linear_attention",
    "magnitude_mask",
    "matmul",
    "repeat_kv",
    "semi_structured_mask",
    "sliding_window_mask",
    "softmax_attention",
    "sparsity",
    "sqnr",
    "topk_mask",
    "wanda_mask",
]

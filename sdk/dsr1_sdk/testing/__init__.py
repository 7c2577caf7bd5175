"""The dsr1 conformance kit: one pytest base class per plugin family.

A plugin's tests are one class per configuration::

    from dsr1_sdk.testing import AttentionConformance

    class TestMine(AttentionConformance):
        plugin = "mine"

The family comes from the base class. See :mod:`dsr1_sdk.testing.base` for the
attributes a test class may set (``plugin``, ``options``, ``device``, ``max_examples``)
and each family module for its case table (``CASES``) and capabilities. The check
functions (``check_attention_case``, ``check_mask`` ...) can also be called directly.

Names are imported lazily, so the pytest plugin (:mod:`.plugin`) in this package costs
nothing; using a kit class imports torch.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

#: What the kits import beyond dsr1-sdk's own dependencies: the ``testing`` extra.
TESTING_EXTRA = ("pytest", "hypothesis")


def require_testing_extra() -> None:
    """Raise one clear ImportError when the kit's test tools are not installed."""
    missing = [m for m in TESTING_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the dsr1 conformance kits need {' and '.join(missing)}: pip install 'dsr1-sdk[testing]'")


# Without pytest nothing can use a kit (pytest alone loads the pytest plugin of this package, so a run
# of pytest without hypothesis still imports this module: that case fails when a kit is used).
if importlib.util.find_spec("pytest") is None:
    require_testing_extra()

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1_sdk.testing.attention import AttentionCase, AttentionConformance, check_attention_case
    from dsr1_sdk.testing.base import PluginConformance, check_options_model, check_packaging
    from dsr1_sdk.testing.decoding import DecodeCase, DecodingConformance, check_decode_case
    from dsr1_sdk.testing.device import DeviceConformance, VendorDeviceConformance, check_matmul, check_probe
    from dsr1_sdk.testing.graph import GraphConformance, check_graph_tokens
    from dsr1_sdk.testing.kvcache import KVCacheConformance
    from dsr1_sdk.testing.monitor import MonitorConformance, check_stats
    from dsr1_sdk.testing.pool import PoolConformance, PoolKit, check_swap_policy, peak_rss_bytes, reset_peak_rss
    from dsr1_sdk.testing.pruning import (
        PruneCase,
        PruningConformance,
        check_mask,
        check_prune_model,
        check_score_definition,
    )
    from dsr1_sdk.testing.quant import (
        QuantCase,
        QuantConformance,
        check_quantize_model,
        check_round_trip,
        check_sqnr,
    )
    from dsr1_sdk.testing.scheduler import SchedulerCase, SchedulerConformance, check_scheduler_trace

# Lazy: the pytest plugin lives in this package and must not import torch on every run.
_LAZY: dict[str, str] = {
    "AttentionCase": "attention",
    "AttentionConformance": "attention",
    "check_attention_case": "attention",
    "MonitorConformance": "monitor",
    "check_stats": "monitor",
    "GraphConformance": "graph",
    "check_graph_tokens": "graph",
    "DecodeCase": "decoding",
    "DecodingConformance": "decoding",
    "check_decode_case": "decoding",
    "PluginConformance": "base",
    "check_options_model": "base",
    "check_packaging": "base",
    "DeviceConformance": "device",
    "KVCacheConformance": "kvcache",
    "check_matmul": "device",
    "check_probe": "device",
    "VendorDeviceConformance": "device",
    "PoolConformance": "pool",
    "PoolKit": "pool",
    "check_swap_policy": "pool",
    "peak_rss_bytes": "pool",
    "reset_peak_rss": "pool",
    "PruneCase": "pruning",
    "PruningConformance": "pruning",
    "check_mask": "pruning",
    "check_prune_model": "pruning",
    "check_score_definition": "pruning",
    "QuantCase": "quant",
    "QuantConformance": "quant",
    "check_quantize_model": "quant",
    "check_round_trip": "quant",
    "check_sqnr": "quant",
    "SchedulerCase": "scheduler",
    "SchedulerConformance": "scheduler",
    "check_scheduler_trace": "scheduler",
}

#: Family → the name of its kit class (``KITS["attention"] == "AttentionConformance"``). Families
#: without a kit of their own (preprocess, model) are checked by ``PluginConformance`` alone.
KITS: dict[str, str] = {
    "attention": "AttentionConformance",
    "device": "DeviceConformance",
    "quant": "QuantConformance",
    "pruning": "PruningConformance",
    "scheduler": "SchedulerConformance",
    "kvcache": "KVCacheConformance",
    "decoding": "DecodingConformance",
    "graph": "GraphConformance",
    "monitor": "MonitorConformance",
    "pool": "PoolConformance",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_testing_extra()
        module = importlib.import_module(f"dsr1_sdk.testing.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'dsr1_sdk.testing' has no attribute {name!r}")


__all__ = [
    "KITS",
    "AttentionCase",
    "AttentionConformance",
    "DecodeCase",
    "DecodingConformance",
    "DeviceConformance",
    "GraphConformance",
    "KVCacheConformance",
    "MonitorConformance",
    "PluginConformance",
    "PoolConformance",
    "PoolKit",
    "PruneCase",
    "PruningConformance",
    "QuantCase",
    "QuantConformance",
    "SchedulerCase",
    "SchedulerConformance",
    "VendorDeviceConformance",
    "check_attention_case",
    "check_decode_case",
    "check_graph_tokens",
    "check_mask",
    "check_matmul",
    "check_options_model",
    "check_packaging",
    "check_probe",
    "check_prune_model",
    "check_quantize_model",
    "check_round_trip",
    "check_scheduler_trace",
    "check_score_definition",
    "check_sqnr",
    "check_stats",
    "check_swap_policy",
    "peak_rss_bytes",
    "reset_peak_rss",
]

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1_sdk.testing.attention import AttentionCase, AttentionConformance, check_attention_case
    from dsr1_sdk.testing.base import PluginConformance, check_options_model, check_packaging
    from dsr1_sdk.testing.device import DeviceConformance, VendorDeviceConformance, check_matmul, check_probe
    from dsr1_sdk.testing.pruning import PruneCase, PruningConformance, check_mask, check_prune_model
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
    "PluginConformance": "base",
    "check_options_model": "base",
    "check_packaging": "base",
    "DeviceConformance": "device",
    "KVCacheConformance": "kvcache",
    "check_matmul": "device",
    "check_probe": "device",
    "VendorDeviceConformance": "device",
    "PruneCase": "pruning",
    "PruningConformance": "pruning",
    "check_mask": "pruning",
    "check_prune_model": "pruning",
    "QuantCase": "quant",
    "QuantConformance": "quant",
    "check_quantize_model": "quant",
    "check_round_trip": "quant",
    "check_sqnr": "quant",
    "SchedulerCase": "scheduler",
    "SchedulerConformance": "scheduler",
    "check_scheduler_trace": "scheduler",
}

#: Family → the name of its kit class (``KITS["attention"] == "AttentionConformance"``).
KITS: dict[str, str] = {
    "attention": "AttentionConformance",
    "device": "DeviceConformance",
    "quant": "QuantConformance",
    "pruning": "PruningConformance",
    "scheduler": "SchedulerConformance",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"dsr1_sdk.testing.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'dsr1_sdk.testing' has no attribute {name!r}")


__all__ = [
    "KITS",
    "AttentionCase",
    "AttentionConformance",
    "DeviceConformance",
    "KVCacheConformance",
    "PluginConformance",
    "PruneCase",
    "PruningConformance",
    "QuantCase",
    "QuantConformance",
    "SchedulerCase",
    "SchedulerConformance",
    "VendorDeviceConformance",
    "check_attention_case",
    "check_mask",
    "check_matmul",
    "check_options_model",
    "check_packaging",
    "check_probe",
    "check_prune_model",
    "check_quantize_model",
    "check_round_trip",
    "check_scheduler_trace",
    "check_sqnr",
]

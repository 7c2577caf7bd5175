"""dsr1-sdk: everything a dsr1 plugin author imports.

A plugin is a module that implements its family's registration hook and returns a
typed :class:`PluginSpec`::

    from dsr1_sdk import AttentionMechanism, PluginOptions, PluginSpec, hookimpl

    class MyAttention(AttentionMechanism):
        def forward(self, query, key, value, mask=None, scale=None):
            ...

    @hookimpl
    def dsr1_attention() -> PluginSpec:
        return PluginSpec(name="mine", family="attention", impl=MyAttention,
                          capabilities=frozenset({"gqa", "mask"}), description="...")

and declares it in its ``pyproject.toml`` under ``[project.entry-points."dsr1.attention"]``.

Importing this package is cheap: it imports pydantic and pluggy, never torch.

* :mod:`dsr1_sdk.reference` - slow, obviously correct oracles per family.
* :mod:`dsr1_sdk.testing` - the conformance kit (``AttentionConformance`` ...).
* :mod:`dsr1_sdk.scaffold` - ``new_plugin(family, name, directory)``.
* :mod:`dsr1_sdk.vendor` - :class:`VendorDevice`, the base of device plugins over a vendor's
  torch extension (``torch_mlu``, ``torch_npu`` ...).
* :mod:`dsr1_sdk.quant` - what quant plugins share: the schemes, ``QuantizedLinear`` and the
  layer plumbing, ``QuantOptions`` and the static policy bases.
* :mod:`dsr1_sdk.pruning` - what pruning plugins share: keep-masks, calibration statistics,
  ``prunable_linears``.
* :mod:`dsr1_sdk.layers` - :class:`~dsr1_sdk.layers.PackedLinear`, a linear layer in a device kernel's own layout.
* :mod:`dsr1_sdk.kernels` - shared CUDA kernels for plugins: ``weight_only.weight_only_mm``, the weight-only
  Triton GEMV / ``tl.dot`` op over int8, int4, fp8 and bf16 weights (triton imported on first use).

A plugin imports only this package, torch, the standard library and its declared dependencies,
never ``dsr1.*``. Every name in a module's ``__all__`` is stable while :data:`API_VERSION`
stays. ``quant``, ``pruning`` and ``layers`` import torch: only the plugins that use them do.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dsr1.engine.plan import ScheduledRequest, SchedulerOutput  # what a scheduler plans (plain data)
from dsr1.engine.request import RequestStatus
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import FAMILIES, hookimpl
from dsr1.interfaces import (
    BASE_CLASSES,
    AttentionMechanism,
    CacheShape,
    Decoder,
    Device,
    GenerationStats,
    GraphPass,
    GraphSteps,
    KVCache,
    MemoryInfo,
    ModelBuilder,
    Monitor,
    OperatorStat,
    Plugin,
    Pool,
    Preprocessor,
    ProbeResult,
    Pruner,
    QuantPolicy,
    Request,
    SamplingParams,
    Scheduler,
    SwapPolicy,
)
from dsr1.specs import API_VERSION, SUPPORTED_API_VERSIONS, NoOptions, PluginSpec, PruningOptions
from dsr1_sdk.options import PluginOptions
from dsr1_sdk.vendor import VendorDevice, VendorOptions

__version__ = "0.1.0"


__all__ = [
    "API_VERSION",
    "BASE_CLASSES",
    "FAMILIES",
    "SUPPORTED_API_VERSIONS",
    "AttentionMechanism",
    "BaseModel",
    "CacheShape",
    "ConfigDict",
    "Decoder",
    "Device",
    "Dsr1Error",
    "Field",
    "GenerationStats",
    "GraphPass",
    "GraphSteps",
    "KVCache",
    "MemoryInfo",
    "ModelBuilder",
    "Monitor",
    "NoOptions",
    "OperatorStat",
    "Plugin",
    "PluginOptions",
    "PluginSpec",
    "Pool",
    "Preprocessor",
    "ProbeResult",
    "Pruner",
    "PruningOptions",
    "QuantPolicy",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SwapPolicy",
    "VendorDevice",
    "VendorOptions",
    "__version__",
    "hookimpl",
]

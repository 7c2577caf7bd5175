"""The map of every extension point in dsr1.

dsr1 has twelve plugin *families*. Each family is one entry-point group
``dsr1.<family>``, one config key ``<family>`` in :class:`dsr1.config.EngineConfig`,
and one registration hook below named ``dsr1_<family>``.

A plugin is a module (the target of its entry point) that implements one or more
of these hooks with :data:`hookimpl`. A registration hook returns a
:class:`dsr1.specs.PluginSpec` (or a list of them): a typed record that names the
implementation class, its pydantic options model, the plugin API version it was
written against and the capabilities it declares. The entry-point name must equal
the spec's ``name``; that name is what users write in config.

Registration hooks are *collecting* hooks: pluggy calls every registered
implementation and the registry indexes the returned records by name. They are
called once, when a pipeline is resolved, never per token or per layer.

The three lifecycle hooks at the end are fired by the engine at build time and
after each scheduler step; any loaded plugin may implement them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

# The twelve families, one hook each below. Defined in dsr1.specs, below the config that has a key per family.
from dsr1.specs import FAMILIES as FAMILIES

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.config import EngineConfig
    from dsr1.specs import PluginSpec

PROJECT = "dsr1"

#: Marker for hook specifications (used only by this module).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marker that plugin authors put on their hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dsr1_preprocess() -> Any:
    """Register text → token-batch implementations (tokenizer, chat template, padding).

    All results are collected. Return a ``PluginSpec`` (or list) whose ``impl``
    subclasses :class:`dsr1.interfaces.Preprocessor`.

    Since API 1.
    """


@hookspec
def dsr1_model() -> Any:
    """Register architecture builders: checkpoint dir → ``torch.nn.Module``.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.ModelBuilder`;
    the spec's ``capabilities`` list the ``model_type`` values (from ``config.json``)
    the builder accepts, as ``"model_type:<name>"``.

    Since API 1.
    """


@hookspec
def dsr1_attention() -> Any:
    """Register attention computations.

    All results are collected. ``impl`` subclasses
    :class:`dsr1.interfaces.AttentionMechanism`; its ``forward(query, key, value, mask=None)``
    is called directly by every layer once the pipeline is resolved.

    Since API 1.
    """


@hookspec
def dsr1_device() -> Any:
    """Register hardware backends.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Device`.
    Importing the plugin module must not start the device runtime: ``probe()``
    reports availability lazily.

    Since API 1.
    """


@hookspec
def dsr1_quant() -> Any:
    """Register precision and quantization policies.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.QuantPolicy`.

    Since API 1.
    """


@hookspec
def dsr1_pruning() -> Any:
    """Register sparsification strategies.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Pruner`.

    Since API 1.
    """


@hookspec
def dsr1_graph() -> Any:
    """Register graph-level rewrites (eager, torch.compile, CUDA graphs, op re-routing).

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.GraphPass`.

    Since API 1.
    """


@hookspec
def dsr1_pool() -> Any:
    """Register placement policies of modules over devices and memory tiers.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Pool`.

    Since API 1.
    """


@hookspec
def dsr1_scheduler() -> Any:
    """Register request batching policies.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Scheduler`.
    Schedulers work on plain request objects and never touch tensors.

    Since API 1.
    """


@hookspec
def dsr1_kvcache() -> Any:
    """Register KV-cache layouts and compression schemes.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.KVCache`.

    Since API 1.
    """


@hookspec
def dsr1_decoding() -> Any:
    """Register sampling / stopping / detokenizing strategies.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Decoder`.

    Since API 1.
    """


@hookspec
def dsr1_monitor() -> Any:
    """Register profiling and telemetry sinks.

    All results are collected. ``impl`` subclasses :class:`dsr1.interfaces.Monitor`.

    Since API 1.
    """


# --- lifecycle events -----------------------------------------------------------------


@hookspec
def dsr1_configure(config: EngineConfig) -> None:
    """Called once after the config is validated and every selected plugin is loaded.

    All implementations are called; return values are ignored.

    :param config: the validated engine config.

    Since API 1.
    """


@hookspec
def dsr1_model_loaded(model: Any, config: EngineConfig) -> None:
    """Called once after a model is built, weights assigned and placed on its device.

    All implementations are called; return values are ignored.

    :param model: the dsr1 model (a ``torch.nn.Module``).
    :param config: the engine config it was built with.

    Since API 1.
    """


@hookspec
def dsr1_step_finished(stats: dict[str, Any]) -> None:
    """Called after each scheduler step (one batch of requests finished generating).

    Never called per token. All implementations are called; return values are ignored.

    :param stats: plain numbers: ``prompt_tokens``, ``new_tokens``, ``prefill_s``, ``decode_s``.

    Since API 1.
    """

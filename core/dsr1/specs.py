"""Typed records about plugins: what their registration hooks return, what their metadata says."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: The plugin API version this core implements. A plugin declares the version it was
#: written against; the core accepts any version in ``SUPPORTED_API_VERSIONS``.
API_VERSION = 1
SUPPORTED_API_VERSIONS: frozenset[int] = frozenset({1})

#: The twelve families, in the order data flows through the engine: one entry-point group, config key and
#: registration hook each (:mod:`dsr1.hookspecs`, which re-exports this tuple).
FAMILIES: tuple[str, ...] = (
    "preprocess",
    "model",
    "attention",
    "device",
    "quant",
    "pruning",
    "graph",
    "pool",
    "scheduler",
    "kvcache",
    "decoding",
    "monitor",
)


@dataclass(frozen=True)
class EntryPointInfo:
    """What metadata alone says about one plugin."""

    family: str
    name: str
    value: str
    distribution: str
    version: str


class NoOptions(BaseModel):
    """Options model of a plugin that takes none (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin registers: one named implementation of one family.

    :param name: the name users write in config; equals the entry-point name.
    :param family: one of :data:`FAMILIES`.
    :param impl: the implementation class (subclass of the family's base class).
    :param api_version: plugin API version the plugin was written against.
    :param options: pydantic model validating ``{"name": ..., "options": {...}}``.
    :param capabilities: optional features the implementation declares; the conformance
        kit tests each one, and a declared capability that fails is a failure.
    :param overrides: set when this plugin deliberately replaces another plugin of the
        same name (for example a faster ``sdpa``); otherwise two claims are an error.
    :param description: one line for ``dsr1 plugins list``.
    """

    name: str
    family: str
    impl: type[Any]
    api_version: int = API_VERSION
    options: type[BaseModel] = NoOptions
    capabilities: frozenset[str] = field(default_factory=frozenset)
    overrides: bool = False
    description: str = ""

    def make(self, options: dict[str, Any] | BaseModel | None = None, **extra: Any) -> Any:
        """Instantiate the implementation with validated options."""
        if not isinstance(options, BaseModel):
            options = self.options.model_validate(options or {})
        return self.impl(options, **extra)


class PruningOptions(BaseModel):
    """Base of a pruning plugin's options model: what an engine config's ``pruning:`` key needs
    to prune a model while it loads (re-exported as ``dsr1_sdk.PruningOptions``).

    ``sparsity`` is the fraction of the prunable linear weights zeroed at load. ``None`` means
    the plugin has no default: the engine config must set it, and leaving it out is refused
    (a pruning key that prunes nothing would be a silent no-op). A plugin with a natural
    sparsity (2:4 is half) declares that default in its own subclass. ``0`` prunes nothing: the
    checkpoint is pruned already and only the plugin's load hooks act (semi24 converts 2:4 weights
    for sparse tensor cores). ``dsr1 prune`` passes its ``--target-sparsity`` itself and refuses
    these keys in ``--option``.

    ``calibration`` feeds activation-aware scores (see :meth:`dsr1.interfaces.Pruner.needs_calibration`):
    a UTF-8 text file, or ``"default"`` for the training split of the dsr1-tiny corpus (what
    ``dsr1 prune`` uses when ``--calibration`` is left out).
    """

    model_config = ConfigDict(extra="forbid")

    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of prunable weights zeroed at load")
    calibration: str | None = Field(None, description="calibration text file, or 'default' for the dsr1-tiny corpus")
    calibration_samples: int = Field(32, ge=1, description="calibration windows of calibration_len tokens")
    calibration_len: int = Field(256, ge=1, description="tokens per calibration window")


#: the keys of :class:`PruningOptions`: set at load by an engine config, never by ``dsr1 prune --option``.
LOAD_PRUNING_KEYS: frozenset[str] = frozenset(PruningOptions.model_fields)

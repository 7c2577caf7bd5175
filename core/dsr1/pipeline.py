"""A resolved pipeline: the selected plugin of each family as a plain object.

Built once by :meth:`dsr1.registry.PluginRegistry.resolve`. The model and the
generation loop call these objects directly; pluggy is only used for the lifecycle
events (``fire_model_loaded``, ``fire_step_finished``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

from dsr1.config import EngineConfig, PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.specs import FAMILIES, EntryPointInfo, PluginSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.interfaces import (
        AttentionMechanism,
        Decoder,
        Device,
        GraphPass,
        KVCache,
        ModelBuilder,
        Monitor,
        Pool,
        Preprocessor,
        Pruner,
        QuantPolicy,
        Scheduler,
    )


class PluginSource(Protocol):
    """What a pipeline and ``device: auto`` use of the :class:`~dsr1.registry.PluginRegistry` that
    resolves them. The registry imports this module to build pipelines; they know it by this protocol."""

    pm: pluggy.PluginManager

    def discover(self, family: str | None = None) -> list[EntryPointInfo]: ...
    def names(self, family: str) -> list[str]: ...
    def allows(self, info: EntryPointInfo) -> bool: ...
    def describe_allowlist(self) -> str: ...
    def load(self, family: str, name: str) -> PluginSpec: ...
    def origin(self, family: str, name: str) -> EntryPointInfo: ...
    def make(self, family: str, choice: PluginChoice, **extra: Any) -> Any: ...


#: prefix of the capabilities a model plugin declares for each ``config.json`` ``model_type`` it builds.
MODEL_TYPE_CAPABILITY = "model_type:"
#: the capability of a model plugin whose models only encode (no ``generate``): the commands that generate
#: refuse its checkpoints before loading them (:func:`dsr1.auto.require_causal_lm`).
ENCODER_CAPABILITY = "encoder"


def declared_model_types(capabilities: frozenset[str]) -> list[str]:
    """The ``model_type`` values a model plugin's capabilities declare (``model_type:llama`` → llama)."""
    return sorted(c[len(MODEL_TYPE_CAPABILITY):] for c in capabilities if c.startswith(MODEL_TYPE_CAPABILITY))


def builder_for(registry: PluginSource, model_type: str) -> str:
    """The model plugin whose spec declares ``model_type:<model_type>``.

    Every installed (and allowed) model plugin is loaded to read its spec; one that fails to
    load is skipped, as an unselected broken plugin affects nothing, and named in the error if
    no other builds the type. Two plugins declaring the same type is an error: nothing wins silently.
    """
    claims: list[str] = []
    known: set[str] = set()
    unchecked: list[str] = []
    for name in registry.names("model"):
        try:
            spec = registry.load("model", name)
        except Dsr1Error as err:
            unchecked.append(f"{name} ({str(err)[:120]})")
            continue
        types = declared_model_types(spec.capabilities)
        known.update(types)
        if model_type in types:
            claims.append(name)
    if len(claims) > 1:
        raise Dsr1Error(f"model_type {model_type!r} is declared by the model plugins {' and '.join(claims)}; pick one "
                        f"in the config, e.g. model: {claims[0]}")
    if not claims:
        skipped = f"; model plugins that could not be checked: {', '.join(unchecked)}" if unchecked else ""
        raise Dsr1Error(f"unknown model_type {model_type!r} in config.json; the installed model plugins build: "
                        f"{', '.join(sorted(known)) or 'nothing'}{skipped}")
    return claims[0]


@dataclass
class Pipeline:
    config: EngineConfig
    registry: PluginSource
    preprocess: Preprocessor
    attention: AttentionMechanism
    device: Device
    quant: QuantPolicy | None
    pruning: Pruner | None
    graph: GraphPass
    pool: Pool
    scheduler: Scheduler
    kvcache: KVCache
    decoding: Decoder
    monitor: Monitor
    #: what ``device: auto`` chose and why (``None`` when a device was named).
    device_selection: Any = None
    #: the effective choice of each family, as resolved (defaults, hardware section and auto applied).
    choices: dict[str, PluginChoice] = field(default_factory=dict)
    #: the checkpoint dir being built (set by ``AutoModel``; ``None`` for in-memory weights). The
    #: pruning step reads the tokenizer there to tokenize its calibration text.
    model_dir: Path | None = None

    def model_builder(self, model_type: str) -> ModelBuilder:
        """The builder for a checkpoint's ``model_type``: the model plugin whose spec declares
        ``model_type:<type>`` (:func:`builder_for`), or the config's ``model`` if it declares it."""
        choice = self.config.model
        if choice is None:
            choice = PluginChoice(name=builder_for(self.registry, model_type))
        else:
            types = declared_model_types(self.registry.load("model", choice.name).capabilities)
            if model_type not in types:
                raise Dsr1Error(f"model {choice.name!r} builds model_type {', '.join(types) or 'nothing'}, not "
                                f"{model_type!r} (config.json); remove 'model' from the config to pick the builder "
                                f"by model_type")
        builder: ModelBuilder = self.registry.make("model", choice)
        return builder

    def prune_(self, model: Any) -> None:
        """Prune ``model`` in place with the ``pruning`` plugin, if one is configured
        (:func:`dsr1.pruning.at_load.prune_at_load`). Builders call it once the weights are
        assigned, before the quant plugin and the pool's placement."""
        if self.pruning is None:
            return
        from dsr1.pruning.at_load import prune_at_load

        choice = self.choices.get("pruning") or self.config.choice("pruning")
        name = choice.name if choice is not None else type(self.pruning).__name__
        prune_at_load(self.pruning, name, model, self.model_dir, self.preprocess)

    def require_device(self) -> None:
        """Refuse a named device that cannot run here, with the probe's reason, before any
        weight is read (``device: auto`` has already picked one that can). ``dsr1 config check``
        does not call this: it reports the device as not available and still checks the rest."""
        if self.device_selection is not None:
            return
        probe = self.device.probe()
        if probe.available:
            return
        choice = self.choices.get("device") or self.config.choice("device")
        name = choice.name if choice is not None else type(self.device).__name__
        hw = self.config.hardware
        via = f" (hardware.type {hw.type!r})" if self.config.device is None and hw is not None else ""
        others = "" if name == "cpu" else "device: cpu, or "
        raise Dsr1Error(f"{name} device{via} is not available here: {probe.reason}; or use {others}device: auto to "
                        f"pick what this machine has")

    def describe(self) -> dict[str, Any]:
        """What every family resolved to: name, distribution, version, options."""
        out: dict[str, Any] = {}
        for family in FAMILIES:
            choice = self.choices.get(family) or self.config.choice(family)
            if choice is None:
                out[family] = {"name": "auto (by model_type)" if family == "model" else None}
                continue
            entry: dict[str, Any] = {"name": choice.name}
            obj = getattr(self, family, None)
            if family == "device" and self.device_selection is not None:
                entry = {"name": self.device_selection.chosen, "auto": self.device_selection.as_dict()}
            if obj is not None:
                info = self.registry.origin(family, entry["name"])
                entry.update(distribution=info.distribution, version=info.version,
                             options=obj.options.model_dump())
            out[family] = entry
        return out

    # --- lifecycle events (build time / per step, never per token) -----------------------

    def fire_model_loaded(self, model: Any) -> None:
        self.registry.pm.hook.dsr1_model_loaded(model=model, config=self.config)

    def fire_step_finished(self, stats: dict[str, Any]) -> None:
        self.registry.pm.hook.dsr1_step_finished(stats=stats)

"""A resolved pipeline: the selected plugin of each family as a plain object.

Built once by :meth:`dsr1.registry.PluginRegistry.resolve`. The model and the
generation loop call these objects directly; pluggy is only used for the lifecycle
events (``fire_model_loaded``, ``fire_step_finished``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsr1.config import EngineConfig, PluginChoice
from dsr1.errors import Dsr1Error

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
    from dsr1.registry import PluginRegistry

#: ``config.json`` ``model_type`` → builtin architecture builder. Types not listed are
#: looked up as a ``dsr1.model`` plugin of the same name.
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "bert": "bert",
}


@dataclass
class Pipeline:
    config: EngineConfig
    registry: PluginRegistry
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

    def model_builder(self, model_type: str) -> ModelBuilder:
        """The builder for a checkpoint's ``model_type`` (explicit config wins)."""
        choice = self.config.model
        if choice is None:
            name = MODEL_TYPES.get(model_type, model_type)
            known = set(MODEL_TYPES) | set(self.registry.names("model"))
            if name not in self.registry.names("model"):
                raise Dsr1Error(
                    f"unknown model_type {model_type!r} in config.json; supported: {', '.join(sorted(known))}"
                )
            choice = PluginChoice(name=name)
        builder: ModelBuilder = self.registry.make("model", choice)
        return builder

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
        for family in ("preprocess", "model", "attention", "device", "quant", "pruning", "graph", "pool",
                       "scheduler", "kvcache", "decoding", "monitor"):
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

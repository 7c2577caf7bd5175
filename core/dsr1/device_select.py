"""``device: auto``: pick the device plugin by probe results, in a documented order.

Order: ``cuda``, ``npu``, ``mlu``, then any other installed device plugin (by name), then ``cpu``.
Each candidate is probed (never started); the first available one wins. The decision, with the
reason each other candidate was rejected, is kept on the pipeline (``Pipeline.device_selection``,
shown by ``describe()``, ``dsr1 config check`` and ``dsr1 generate --json``) and logged.
Nothing is picked silently: when no candidate is available the error lists every reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsr1.config import PluginChoice
from dsr1.distributions import pip_hint
from dsr1.errors import Dsr1Error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.interfaces import Device
    from dsr1.pipeline import PluginSource

#: accelerators first, the CPU last; installed plugins not listed go between them, by name.
AUTO_ORDER: tuple[str, ...] = ("cuda", "npu", "mlu")


@dataclass
class DeviceSelection:
    """What ``device: auto`` chose and why every other candidate was rejected."""

    chosen: str
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "reason": self.reason, "rejected": dict(self.rejected)}

    def summary(self) -> str:
        rejected = "; ".join(f"{name}: {why}" for name, why in self.rejected.items()) or "none"
        return f"device auto chose {self.chosen!r} ({self.reason}); rejected: {rejected}"


def candidates(installed: list[str]) -> list[str]:
    """The probe order over every name worth trying (installed or not)."""
    others = sorted(n for n in installed if n not in AUTO_ORDER and n != "cpu")
    return [*AUTO_ORDER, *others, "cpu"]


def select_device(registry: PluginSource, options: dict[str, Any]) -> tuple[Device, DeviceSelection]:
    """Probe the candidates in order; return the first available device and the decision.

    ``options`` go to the chosen plugin only (they must fit its options model)."""
    installed = registry.names("device")
    rejected: dict[str, str] = {}
    for name in candidates(installed):
        if name not in installed:
            rejected[name] = f"not installed ({pip_hint('device', name)})"
            continue
        if not any(registry.allows(info) for info in registry.discover("device") if info.name == name):
            rejected[name] = f"not allowed by DSR1_PLUGINS ({registry.describe_allowlist()})"
            continue
        try:
            probe = registry.make("device", PluginChoice(name=name)).probe()
        except Exception as err:  # noqa: BLE001 - a broken plugin is a rejected candidate, with the reason
            rejected[name] = f"broken: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        if not probe.available:
            rejected[name] = f"not available: {probe.reason}"
            continue
        device: Device = registry.make("device", PluginChoice(name=name, options=options))
        selection = DeviceSelection(chosen=name, reason=probe.reason or "available", rejected=rejected)
        logging.getLogger("dsr1").info(selection.summary())
        return device, selection
    reasons = "; ".join(f"{n}: {why}" for n, why in rejected.items())
    raise Dsr1Error(f"device auto found no usable device ({reasons})")

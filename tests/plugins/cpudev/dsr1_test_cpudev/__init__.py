"""``cpudev``: a test-only device that runs on the host CPU and says so.

It exists to drive the whole device path (selection by name, probe, placement, forward
pass) through a device plugin that is not a builtin, on machines without accelerators. It
claims nothing it does not do: its torch device type is ``"cpu"``, its probe reason and
description name it a test device, and its memory is the host's. The CPU semantics (one
device, memory from ``sysconf``, nothing to synchronize) are the SDK's
:class:`~dsr1_sdk.reference.CpuReferenceDevice`; this package adds its name, options and dtypes.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import ProbeResult
from dsr1.specs import PluginSpec
from dsr1_sdk.reference.device import CpuReferenceDevice

#: The name a user sees: it says this is not real hardware.
NAME = "cpudev (CPU-backed test device, not an accelerator)"


class CpudevOptions(BaseModel):
    """Options of the test device (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field("cpudev", description="free text echoed in the probe reason")


class CpudevDevice(CpuReferenceDevice):
    """The host CPU presented through the device plugin path."""

    Options = CpudevOptions
    options: CpudevOptions

    #: Human-readable name of the device (tests check it says "test").
    name = NAME

    def probe(self) -> ProbeResult:
        return ProbeResult(available=True, reason=f"{self.options.label}: {NAME}, runs on the host CPU", device_count=1)

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="cpudev",
        family="device",
        impl=CpudevDevice,
        options=CpudevOptions,
        capabilities=frozenset({"fp16", "bf16", "compile:inductor", "test-only"}),
        description="CPU-backed test device (tests only, never published)",
    )

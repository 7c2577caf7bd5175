"""``cpudev``: a test-only device that runs on the host CPU and says so.

It exists to drive the whole device path (selection by name, probe, placement, forward
pass) through a device plugin that is not a builtin, on machines without accelerators. It
claims nothing it does not do: its torch device type is ``"cpu"``, its probe reason and
description name it a test device, and its memory is the host's.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, MemoryInfo, ProbeResult
from dsr1.specs import PluginSpec

#: The name a user sees: it says this is not real hardware.
NAME = "cpudev (CPU-backed test device, not an accelerator)"


class CpudevOptions(BaseModel):
    """Options of the test device (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field("cpudev", description="free text echoed in the probe reason")


class CpudevDevice(Device):
    """The host CPU presented through the device plugin path."""

    Options = CpudevOptions
    options: CpudevOptions
    torch_device_type = "cpu"
    collective_backend = "gloo"
    visible_devices_env = ""

    #: Human-readable name of the device (tests check it says "test").
    name = NAME

    def probe(self) -> ProbeResult:
        return ProbeResult(available=True, reason=f"{self.options.label}: {NAME}, runs on the host CPU", device_count=1)

    def device_count(self) -> int:
        return 1

    def memory_info(self, index: int = 0) -> MemoryInfo:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = min(os.sysconf("SC_AVPHYS_PAGES") * page, total)
        return MemoryInfo(total=total, free=free, used=total - free)

    def synchronize(self, index: int = 0) -> None:
        """CPU kernels are synchronous: nothing to wait for."""

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        return "inductor", {}


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

"""``cpu``: the host CPU as a dsr1 device.

Always available. Memory comes from ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``),
capped by the cgroup v2 limit when the process runs in a container with a smaller one;
elsewhere from psutil when it is installed, else from ``sysconf``. The ``threads`` option
sets torch's intra-op thread count when the engine builds the device (never at import).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsr1_sdk import Device, Field, MemoryInfo, PluginOptions, PluginSpec, ProbeResult, hookimpl

__all__ = ["CpuDevice", "CpuOptions", "dsr1_device", "read_memory"]

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class CpuOptions(PluginOptions):
    """Options of the ``cpu`` device."""

    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")


def _meminfo(path: Path | None = None) -> tuple[int, int] | None:
    """``(total, available)`` bytes from ``/proc/meminfo``, or ``None`` where it does not exist."""
    path = MEMINFO if path is None else path
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024  # "16318712 kB"
        available = int(fields.get("MemAvailable", fields["MemFree"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return total, available


def _cgroup_limit(root: Path | None = None) -> tuple[int, int] | None:
    """``(limit, current)`` bytes of this cgroup v2, or ``None`` without a numeric limit."""
    root = CGROUP if root is None else root
    try:
        limit = (root / "memory.max").read_text().strip()
        current = (root / "memory.current").read_text().strip()
        return (int(limit), int(current)) if limit.isdigit() and current.isdigit() else None
    except OSError:
        return None


def read_memory() -> MemoryInfo:
    """Host memory as seen by this process (see the module docstring for the sources)."""
    found = _meminfo()
    if found is None:
        try:
            import psutil  # optional: not a dependency

            vm = psutil.virtual_memory()
            found = (int(vm.total), int(vm.available))
        except ImportError:
            page = os.sysconf("SC_PAGE_SIZE")
            found = (os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page)
    total, free = found
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup[0] < total:
        total = cgroup[0]
        free = min(free, max(total - cgroup[1], 0))
    free = min(free, total)
    return MemoryInfo(total=total, free=free, used=total - free)


class CpuDevice(Device):
    """The host CPU; see the module docstring."""

    Options = CpuOptions
    options: CpuOptions
    torch_device_type = "cpu"
    collective_backend = "gloo"
    visible_devices_env = ""

    def __init__(self, options: CpuOptions | None = None) -> None:
        super().__init__(options)
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)

    def probe(self) -> ProbeResult:
        return ProbeResult(available=True, reason=f"host CPU, {torch.get_num_threads()} torch threads", device_count=1)

    def device_count(self) -> int:
        return 1

    def memory_info(self, index: int = 0) -> MemoryInfo:
        return read_memory()

    def synchronize(self, index: int = 0) -> None:
        """CPU kernels are synchronous: nothing to wait for."""

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16, torch.float64]

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        return "inductor", {}

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        return {"mode": "max-autotune-no-cudagraphs"} if strategy == "auto" else {}


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="cpu",
        family="device",
        impl=CpuDevice,
        options=CpuOptions,
        capabilities=frozenset({"fp16", "bf16", "compile:inductor"}),
        description="the host CPU (memory from /proc/meminfo, thread count option, inductor)",
    )

"""The CPU semantics every device backend is compared with.

:class:`CpuReferenceDevice` is the smallest correct :class:`~dsr1.interfaces.Device`:
always available, one device, memory from ``sysconf``, nothing to synchronize.
:func:`matmul` is the float64 CPU product that device results are checked against.
"""
from __future__ import annotations

import os

import torch

from dsr1.interfaces import Device, MemoryInfo, ProbeResult


class CpuReferenceDevice(Device):
    """The host CPU, described as plainly as possible."""

    torch_device_type = "cpu"
    collective_backend = "gloo"
    visible_devices_env = ""

    def probe(self) -> ProbeResult:
        return ProbeResult(available=True, reason="the host CPU is always available", device_count=1)

    def device_count(self) -> int:
        return 1

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = min(os.sysconf("SC_AVPHYS_PAGES") * page, total)
        return MemoryInfo(total=total, free=free, used=total - free)

    def synchronize(self, index: int | None = None) -> None:
        """CPU kernels run synchronously: nothing to wait for."""

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64 on the CPU: ``(M, K) @ (K, N)`` → ``(M, N)`` float64."""
    return a.detach().to("cpu", torch.float64) @ b.detach().to("cpu", torch.float64)


def check_memory_info(info: MemoryInfo, slack: float = 0.01) -> list[str]:
    """Problems with a :class:`MemoryInfo` (empty: consistent).

    ``total == free + used`` within ``slack`` of ``total`` (allocators round, and the two
    numbers are read a moment apart); every number non-negative; ``free <= total``.
    """
    problems: list[str] = []
    for field in ("total", "free", "used"):
        value = getattr(info, field)
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{field} is {type(value).__name__}, expected int bytes")
        elif value < 0:
            problems.append(f"{field} is negative ({value})")
    if problems:
        return problems
    if info.total <= 0:
        problems.append(f"total is {info.total}, expected > 0")
    if info.free > info.total:
        problems.append(f"free ({info.free}) exceeds total ({info.total})")
    if abs(info.total - info.free - info.used) > slack * max(info.total, 1):
        problems.append(f"total ({info.total}) != free ({info.free}) + used ({info.used}) within {slack:.0%}")
    return problems

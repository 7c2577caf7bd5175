"""``cpu``: the host CPU as a dsr1 device.

Always available. Memory comes from ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``),
capped by the cgroup v2 limit when the process runs in a container with a smaller one;
elsewhere from psutil when it is installed (the ``psutil`` extra: ``pip install
'dsr1-device-cpu[psutil]'``, for macOS), else from ``sysconf``. The ``threads`` option sets
torch's intra-op thread count when the engine builds the device (never at import).

``return_freed_weights`` (glibc only): while the engine loads or relayouts weights
(:meth:`CpuDevice.relayout_memory`), buffers of 1 MiB and more are mapped on their own and go
back to the system when freed. glibc's adaptive thresholds would serve them from its heap and
keep the freed ones resident: loading tiny-125m (500 MB of fp32 weights) then peaked 36 MiB
higher, and relayouting it for batched decode (``dsr1.models.packing``) 80 MiB higher. Outside
that scope the thresholds sit at glibc's adaptive ceilings (32 MiB mapped, 64 MiB kept at the
heap top), so activations reuse the heap: a fixed 1 MiB threshold made a batch-8 prefill of
tiny-125m 40 % slower (page faults on every large activation).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from dsr1_sdk import Device, Dsr1Error, Field, MemoryInfo, PluginOptions, PluginSpec, ProbeResult, hookimpl

__all__ = ["CpuDevice", "CpuOptions", "dsr1_device", "read_memory"]

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class CpuOptions(PluginOptions):
    """Options of the ``cpu`` device."""

    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    linear_kernel: Literal["auto", "panels", "none"] = Field(
        "auto", description="fp32 linear layers: 'panels' = dsr1's AVX-512 panel kernel (built at first use, "
        "needs a C++ compiler); 'none' = the model's own layout (MKL / oneDNN); 'auto' = panels where they "
        "build and run, else none, with a warning saying why",
    )
    return_freed_weights: bool = Field(
        True, description="glibc: freed weight buffers go back to the system while weights are loaded or "
        "relaid out (a lower peak); false leaves glibc's allocator alone",
    )


#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: mmap threshold while weights are loaded or relaid out, and outside (glibc's adaptive ceiling).
RELAYOUT_MMAP_BYTES, COMPUTE_MMAP_BYTES = 2**20, 32 * 2**20


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def glibc() -> ctypes.CDLL | None:
    """The C library, when it is glibc (the only one ``return_freed_weights`` applies to)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):  # no such confstr name, or no libc.so.6
        return None


def set_mmap_threshold(libc: ctypes.CDLL | None, nbytes: int) -> None:
    """Fix glibc's mmap threshold at ``nbytes`` and its heap-top trim threshold at twice that."""
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, nbytes) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes) != 1:
        raise Dsr1Error("device cpu: glibc refused mallopt; set the device option return_freed_weights: false")


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
            import psutil  # the optional `psutil` extra

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
        self._libc = glibc() if self.options.return_freed_weights else None
        if self._libc is None and "return_freed_weights" in self.options.model_fields_set and self.options.return_freed_weights:
            raise Dsr1Error("device cpu: return_freed_weights needs glibc, and this C library is not glibc; "
                            "set it to false")

    def probe(self) -> ProbeResult:
        return ProbeResult(available=True, reason=f"host CPU, {torch.get_num_threads()} torch threads", device_count=1)

    def device_count(self) -> int:
        return 1

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        return read_memory()

    def synchronize(self, index: int | None = None) -> None:
        """CPU kernels are synchronous: nothing to wait for."""

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16, torch.float64]

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        return "inductor", {}

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        return {"mode": "max-autotune-no-cudagraphs"} if strategy == "auto" else {}

    def pack_linear(self, linear: Any) -> Any | None:
        """fp32 CPU ``nn.Linear`` layers as :class:`~dsr1_device_cpu.panels.PanelLinear` (option ``linear_kernel``)."""
        choice = self.options.linear_kernel
        weight = getattr(linear, "weight", None)
        if (choice == "none" or type(linear) is not torch.nn.Linear or weight is None
                or weight.dtype != torch.float32 or weight.device.type != "cpu"):
            return None
        from dsr1_device_cpu import panels

        reason = panels.unavailable()
        if reason is not None:
            if choice == "panels":
                raise Dsr1Error(f"device cpu: linear_kernel 'panels' cannot run here: {reason}")
            _warn_once(f"device cpu: fp32 linear layers keep MKL/oneDNN, not the panel kernel: {reason} "
                       "(set linear_kernel: none to silence this)")
            return None
        return panels.pack_linear(linear)

    @contextlib.contextmanager
    def relayout_memory(self) -> Iterator[None]:
        """Freed buffers of 1 MiB and more go back to the system inside (see the module docstring)."""
        if self._libc is None:
            yield
            return
        set_mmap_threshold(self._libc, RELAYOUT_MMAP_BYTES)
        try:
            yield
        finally:
            set_mmap_threshold(self._libc, COMPUTE_MMAP_BYTES)


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="cpu",
        family="device",
        impl=CpuDevice,
        options=CpuOptions,
        capabilities=frozenset({"fp16", "bf16", "compile:inductor"}),
        description="the host CPU (memory from /proc/meminfo, thread count, AVX-512 panel kernel for fp32 linears, freed weights returned to the system, inductor)",
    )

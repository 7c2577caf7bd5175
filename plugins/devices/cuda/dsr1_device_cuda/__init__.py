"""``cuda``: NVIDIA GPUs through ``torch.cuda``.

Importing this module and calling ``probe()`` never initializes CUDA:
``torch.cuda.is_available()`` and ``torch.cuda.device_count()`` ask the driver (or NVML)
without creating a context. When CUDA cannot be used, ``probe()`` says why, in this order:
torch was built without CUDA; the driver refused (its own message); no device is visible
(with the value of ``CUDA_VISIBLE_DEVICES``). Everything else needs a device and starts
CUDA lazily on first use, as torch does.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import torch

from dsr1_sdk import Device, Dsr1Error, Field, MemoryInfo, PluginOptions, PluginSpec, ProbeResult, hookimpl

__all__ = ["CudaDevice", "CudaOptions", "dsr1_device"]

InductorValue = bool | int | float | str


class CudaOptions(PluginOptions):
    """Options of the ``cuda`` device."""

    cudagraphs: bool = Field(False, description="let inductor capture CUDA graphs (mode max-autotune)")
    matmul_precision: Literal["highest", "high", "medium"] | None = Field(
        None, description="torch.set_float32_matmul_precision when the device is built ('high' allows TF32)"
    )
    inductor_options: dict[str, InductorValue] = Field(
        default_factory=dict, description="extra torch._inductor config passed to torch.compile(options=...)"
    )


class CudaDevice(Device):
    """NVIDIA GPUs; see the module docstring."""

    Options = CudaOptions
    options: CudaOptions
    torch_device_type = "cuda"
    collective_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    def __init__(self, options: CudaOptions | None = None) -> None:
        super().__init__(options)
        if self.options.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.options.matmul_precision)

    # --- without initializing CUDA ------------------------------------------------------

    def probe(self) -> ProbeResult:
        if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]  # untyped in torch
            return ProbeResult(
                available=False,
                reason=f"torch {torch.__version__} is built without CUDA; install a CUDA build of torch",
            )
        with warnings.catch_warnings(record=True) as caught:  # the driver speaks through a UserWarning
            warnings.simplefilter("always")
            available = torch.cuda.is_available()
            count = torch.cuda.device_count() if available else 0
        if available and count > 0:
            return ProbeResult(available=True, reason=f"{count} CUDA device(s) visible", device_count=count)
        driver = [str(w.message).strip() for w in caught if "CUDA" in str(w.message) or "driver" in str(w.message)]
        if driver:
            return ProbeResult(available=False, reason=f"the CUDA driver refused: {driver[0].splitlines()[0]}")
        visible = os.environ.get(self.visible_devices_env)
        shown = "unset" if visible is None else repr(visible)
        return ProbeResult(available=False, reason=f"no CUDA device visible ({self.visible_devices_env}={shown})")

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        return "inductor", {"triton.cudagraphs": self.options.cudagraphs, **self.options.inductor_options}

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        if strategy != "auto":
            return {}
        return {"mode": "max-autotune" if self.options.cudagraphs else "max-autotune-no-cudagraphs"}

    # --- needing a device ---------------------------------------------------------------

    def torch_device(self, index: int | None = None) -> torch.device:
        # the engine refuses an unavailable device when it resolves the config; this catches
        # callers that build the device by hand, before torch's assertion deep in a tensor copy
        if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]  # untyped in torch
            raise Dsr1Error(f"cuda device is not available here: torch {torch.__version__} is built without CUDA; "
                            f"install a CUDA build of torch, or use device: cpu")
        return super().torch_device(index)

    def _index(self, index: int | None) -> int:
        return self.local_index() if index is None else index

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self._index(index))  # whole device, all processes
        return MemoryInfo(total=int(total), free=int(free), used=int(total - free))

    def synchronize(self, index: int | None = None) -> None:
        torch.cuda.synchronize(self._index(index))

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32, torch.float16, torch.float64]
        if torch.cuda.is_bf16_supported():
            dtypes.insert(1, torch.bfloat16)
        return dtypes

    def compute_capability(self, index: int | None = None) -> tuple[int, int]:
        """``(major, minor)``: 8.0 A100, 8.9 L4/4090, 9.0 H100/H200."""
        major, minor = torch.cuda.get_device_capability(self._index(index))
        return int(major), int(minor)

    def stream(self, index: int | None = None) -> torch.cuda.Stream:
        """A new CUDA stream on device ``index`` (capability ``streams``)."""
        return torch.cuda.Stream(device=self._index(index))  # type: ignore[no-untyped-call]  # untyped in torch

    def event(self, enable_timing: bool = True) -> torch.cuda.Event:
        """A CUDA event for timing and cross-stream waits (capability ``events``)."""
        return torch.cuda.Event(enable_timing=enable_timing)  # type: ignore[no-untyped-call]  # untyped in torch


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="cuda",
        family="device",
        impl=CudaDevice,
        options=CudaOptions,
        capabilities=frozenset(
            {"fp16", "bf16", "streams", "events", "cuda_graphs", "collective:nccl", "compile:inductor"}
        ),
        description="NVIDIA GPUs through torch.cuda (lazy probe, NCCL, inductor)",
    )

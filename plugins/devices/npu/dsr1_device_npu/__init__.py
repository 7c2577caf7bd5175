"""``npu``: Huawei Ascend NPUs (Atlas 800 A2 / 910B ...) through Huawei's ``torch_npu``.

Importing this module imports neither torch nor ``torch_npu``. ``probe()`` first asks
``importlib.util.find_spec("torch_npu")``; only when the package is there does it import
it (which registers ``torch.npu``) and count devices with ``torch.npu.device_count()``.
When the NPU cannot be used, ``probe()`` says why, first match wins: the package is
missing; it failed to import (usually the CANN libraries are not on the library path:
``source /usr/local/Ascend/ascend-toolkit/set_env.sh``); the runtime refused; no device is
visible (with ``ASCEND_RT_VISIBLE_DEVICES``); ``device_index`` is out of range.
``probe()`` never raises.

Everything else needs a device: called where there is none, it raises a one-line
:class:`~dsr1_sdk.Dsr1Error` ``"npu device is not available here: <reason>"``. The
``memory_fraction`` and ``jit_compile`` options are applied on the first such call.

With torch >= 2.5 an installed torch_npu is also loaded by ``import torch`` itself (torch's
device-backend autoload, off with ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``); this plugin adds
no import of its own.

The probe and the device calls are the SDK's :class:`~dsr1_sdk.VendorDevice`; this module
names the Ascend specifics, the compile settings and ``jit_compile``.
"""
from __future__ import annotations

from typing import Any, Literal

from dsr1_sdk import Dsr1Error, Field, PluginSpec, VendorDevice, VendorOptions, hookimpl

__all__ = ["MISSING", "NpuDevice", "NpuOptions", "dsr1_device"]

#: The vendor extension this plugin drives.
PACKAGE = "torch_npu"
#: Probe reason when the extension is not installed.
MISSING = (
    "torch_npu is not installed (pip install torch-npu matching your torch version; "
    "needs the Ascend driver and CANN toolkit)"
)


class NpuOptions(VendorOptions):
    """Options of the ``npu`` device (``device_index`` and ``memory_fraction`` come from the SDK)."""

    compile_backend: Literal["npu", "inductor"] = Field(
        "npu",
        description="'npu': torchair (Ascend graph engine), registered by torch_npu; "
        "'inductor': torch_npu's inductor backend (needs triton-ascend)",
    )
    jit_compile: bool | None = Field(
        None, description="torch.npu.set_compile_mode(jit_compile=...) on first use (None: torch_npu's default)"
    )


class NpuDevice(VendorDevice):
    """Huawei Ascend NPUs; see the module docstring."""

    Options = NpuOptions
    options: NpuOptions
    package = PACKAGE
    vendor = "Ascend"
    missing = MISSING
    import_hint = "check the Ascend driver, the CANN toolkit's set_env.sh and that torch_npu was built for this torch"
    torch_device_type = "npu"
    collective_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        """``("npu", {})``: the TorchDynamo backend torch_npu registers (torchair's ``get_npu_backend()``
        with its default ``CompilerConfig``); or ``("inductor", {})`` when the option asks for it."""
        return self.options.compile_backend, {}

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        """``auto`` with inductor: max-autotune without graph capture. torchair's registered backend
        takes no ``mode``/``options`` through ``torch.compile``: the Ascend graph engine picks its own
        tilings, so both strategies give ``{}`` there."""
        if strategy not in ("auto", "fixed"):
            raise Dsr1Error(f"tiling_strategy must be 'auto' or 'fixed', got {strategy!r}")
        if strategy == "auto" and self.options.compile_backend == "inductor":
            return {"mode": "max-autotune-no-cudagraphs"}
        return {}

    def first_use(self, module: Any) -> None:
        """``jit_compile``, when set: ``torch.npu.set_compile_mode(jit_compile=...)``."""
        if self.options.jit_compile is not None:
            module.set_compile_mode(jit_compile=self.options.jit_compile)


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="npu",
        family="device",
        impl=NpuDevice,
        options=NpuOptions,
        capabilities=frozenset({"fp16", "streams", "events", "collective:hccl", "compile:npu"}),
        description="Huawei Ascend NPUs through torch_npu (lazy probe, HCCL, torchair; bf16 where the NPU has it)",
    )

"""``mlu``: Cambricon MLUs (MLU370, MLU590 ...) through Cambricon's ``torch_mlu``.

Importing this module imports neither torch nor ``torch_mlu``. ``probe()`` first asks
``importlib.util.find_spec("torch_mlu")``; only when the package is there does it import
it (which registers ``torch.mlu``) and count devices with ``torch.mlu.device_count()``
(CNDEV when it can, else the CN runtime; neither creates a context). When the MLU cannot
be used, ``probe()`` says why, first match wins: the package is missing; it failed to import
(usually a missing driver/CNToolkit library); the runtime refused; no device is visible
(with ``MLU_VISIBLE_DEVICES``); ``device_index`` is out of range. ``probe()`` never raises.

Everything else needs a device: called where there is none, it raises a one-line
:class:`~dsr1_sdk.Dsr1Error` ``"mlu device is not available here: <reason>"``. The
``memory_fraction`` option is applied on the first such call, never at construction.

The probe and the device calls are the SDK's :class:`~dsr1_sdk.VendorDevice`; this module
names the Cambricon specifics and the compile settings.
"""
from __future__ import annotations

from typing import Any

from dsr1_sdk import Dsr1Error, Field, PluginSpec, VendorDevice, VendorOptions, hookimpl

__all__ = ["MISSING", "MluDevice", "MluOptions", "dsr1_device"]

#: The vendor extension this plugin drives.
PACKAGE = "torch_mlu"
#: Probe reason when the extension is not installed.
MISSING = (
    "torch_mlu is not installed (pip install torch_mlu from Cambricon's channel; "
    "needs the Cambricon driver and CNToolkit)"
)
#: Inductor switches torch_mlu turns on when it is imported (``torch_mlu/_inductor/config.py``);
#: ``tiling_strategy: fixed`` turns them off again so that "fixed" means no autotuning.
AUTOTUNE_SWITCHES = ("max_autotune", "max_autotune_pointwise")

InductorValue = bool | int | float | str


class MluOptions(VendorOptions):
    """Options of the ``mlu`` device (``device_index`` and ``memory_fraction`` come from the SDK)."""

    inductor_options: dict[str, InductorValue] = Field(
        default_factory=dict, description="extra torch._inductor config passed to torch.compile(options=...)"
    )


class MluDevice(VendorDevice):
    """Cambricon MLUs; see the module docstring."""

    Options = MluOptions
    options: MluOptions
    package = PACKAGE
    vendor = "Cambricon"
    missing = MISSING
    import_hint = "check the Cambricon driver, CNToolkit and that torch_mlu was built for this torch"
    torch_device_type = "mlu"
    collective_backend = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"

    def compile_backend(self) -> tuple[str, dict[str, Any]]:
        """TorchInductor: importing torch_mlu registers the MLU with inductor (Triton-MLU kernels)."""
        return "inductor", dict(self.options.inductor_options)

    def autotune_settings(self, strategy: str) -> dict[str, Any]:
        """``auto``: inductor max-autotune without graph capture; ``fixed``: autotuning off."""
        if strategy == "auto":
            return {"mode": "max-autotune-no-cudagraphs"}
        if strategy == "fixed":
            return {name: False for name in AUTOTUNE_SWITCHES}
        raise Dsr1Error(f"tiling_strategy must be 'auto' or 'fixed', got {strategy!r}")


@hookimpl
def dsr1_device() -> PluginSpec:
    return PluginSpec(
        name="mlu",
        family="device",
        impl=MluDevice,
        options=MluOptions,
        capabilities=frozenset({"fp16", "streams", "events", "collective:cncl", "compile:inductor"}),
        description="Cambricon MLUs through torch_mlu (lazy probe, CNCL, inductor; bf16 where the MLU has it)",
    )

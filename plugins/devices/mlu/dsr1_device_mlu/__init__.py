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
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import TYPE_CHECKING, Any

from dsr1_sdk import Device, Dsr1Error, Field, MemoryInfo, PluginOptions, PluginSpec, ProbeResult, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

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


class MluOptions(PluginOptions):
    """Options of the ``mlu`` device."""

    device_index: int = Field(0, ge=0, description="the MLU used when a method is given no index")
    memory_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="torch.mlu.set_per_process_memory_fraction on first use (None: no cap)",
    )
    inductor_options: dict[str, InductorValue] = Field(
        default_factory=dict, description="extra torch._inductor config passed to torch.compile(options=...)"
    )


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` that answers ``None`` instead of raising."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _visible(env: str) -> str:
    value = os.environ.get(env)
    return f"{env}=unset" if value is None else f"{env}={value!r}"


class MluDevice(Device):
    """Cambricon MLUs; see the module docstring."""

    Options = MluOptions
    options: MluOptions
    torch_device_type = "mlu"
    collective_backend = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"

    def __init__(self, options: MluOptions | None = None) -> None:
        super().__init__(options)
        self._ready: ProbeResult | None = None  # the first available probe, cached
        self._fraction_set: set[int] = set()

    # --- without a device -----------------------------------------------------------------

    def probe(self) -> ProbeResult:
        if _find_spec(PACKAGE) is None:
            return ProbeResult(available=False, reason=MISSING)
        with warnings.catch_warnings(record=True) as caught:  # CNDEV/CNRT speak through warnings
            warnings.simplefilter("always")
            try:
                importlib.import_module(PACKAGE)
            except Exception as err:  # noqa: BLE001 - a broken install is a reason, never a crash
                return ProbeResult(
                    available=False,
                    reason=f"torch_mlu failed to import: {_one_line(err)} (check the Cambricon driver, "
                    "CNToolkit and that torch_mlu was built for this torch)",
                )
            mlu = self._module()
            if mlu is None:
                return ProbeResult(
                    available=False, reason="torch_mlu imported but registered no torch.mlu (torch/torch_mlu mismatch?)"
                )
            try:
                count = int(mlu.device_count())
            except Exception as err:  # noqa: BLE001 - the runtime's own words are the reason
                return ProbeResult(available=False, reason=f"the Cambricon runtime refused: {_one_line(err)}")
        if count <= 0:
            driver = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            if driver:
                return ProbeResult(available=False, reason=f"the Cambricon driver refused: {driver[0]}")
            return ProbeResult(available=False, reason=f"no MLU device visible ({_visible(self.visible_devices_env)})")
        if self.options.device_index >= count:
            return ProbeResult(
                available=False,
                reason=f"device_index {self.options.device_index} is out of range: {count} MLU device(s) visible "
                f"({_visible(self.visible_devices_env)})",
            )
        return ProbeResult(available=True, reason=f"{count} MLU device(s) visible", device_count=count)

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

    # --- needing a device -----------------------------------------------------------------

    @staticmethod
    def _module() -> Any:
        import torch

        return getattr(torch, "mlu", None)

    def _mlu(self, index: int | None = None) -> Any:
        """``torch.mlu`` once a probe has said available; else a one-line :class:`Dsr1Error`."""
        if self._ready is None:
            result = self.probe()
            if not result.available:
                raise Dsr1Error(f"mlu device is not available here: {result.reason}")
            self._ready = result
        mlu = self._module()
        if index is not None and self.options.memory_fraction is not None and index not in self._fraction_set:
            mlu.set_per_process_memory_fraction(self.options.memory_fraction, index)
            self._fraction_set.add(index)
        return mlu

    def _index(self, index: int | None) -> int:
        return self.options.device_index if index is None else index

    def device_count(self) -> int:
        return int(self._mlu().device_count())

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        """Free and total of the whole MLU (all processes), from ``torch.mlu.mem_get_info``."""
        i = self._index(index)
        free, total = self._mlu(i).mem_get_info(i)
        return MemoryInfo(total=int(total), free=int(free), used=int(total - free))

    def allocated(self, index: int | None = None) -> int:
        """Bytes held by this process's tensors (``torch.mlu.memory_allocated``)."""
        i = self._index(index)
        return int(self._mlu(i).memory_allocated(i))

    def synchronize(self, index: int | None = None) -> None:
        i = self._index(index)
        self._mlu(i).synchronize(i)

    def supported_dtypes(self) -> list[torch.dtype]:
        """fp32 and fp16 everywhere; bf16 where ``torch.mlu.is_bf16_supported()`` says so."""
        import torch

        mlu = self._mlu(self.options.device_index)
        dtypes = [torch.float32, torch.float16]
        with mlu.device(self.options.device_index):
            if mlu.is_bf16_supported():
                dtypes.insert(1, torch.bfloat16)
        return dtypes

    def torch_device(self, index: int | None = None) -> torch.device:
        import torch

        i = self._index(index)
        self._mlu(i)
        return torch.device(self.torch_device_type, i)

    def stream(self, index: int | None = None) -> Any:
        """A new ``torch.mlu.Stream`` on device ``index`` (capability ``streams``)."""
        i = self._index(index)
        return self._mlu(i).Stream(device=i)

    def event(self, enable_timing: bool = True) -> Any:
        """A ``torch.mlu.Event`` for timing and cross-stream waits (capability ``events``)."""
        return self._mlu().Event(enable_timing=enable_timing)


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

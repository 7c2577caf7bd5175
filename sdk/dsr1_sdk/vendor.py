"""What a device plugin over a vendor's torch extension (``torch_mlu``, ``torch_npu`` ...) shares.

The extension registers a ``torch.<type>`` namespace shaped like ``torch.cuda``. A plugin
subclasses :class:`VendorDevice`, names the vendor specifics as class attributes, and adds
its own options, compile backend and autotune settings::

    class MluDevice(VendorDevice):
        Options = MluOptions
        package = "torch_mlu"
        vendor = "Cambricon"
        missing = "torch_mlu is not installed (...)"
        import_hint = "check the Cambricon driver, CNToolkit and ..."
        torch_device_type = "mlu"
        collective_backend = "cncl"
        visible_devices_env = "MLU_VISIBLE_DEVICES"

Importing this module imports neither torch nor the extension. ``probe()`` first asks
``importlib.util.find_spec(package)``; only when the package is there does it import it and
count devices with ``torch.<type>.device_count()``. When the device cannot be used, ``probe()``
says why, first match wins: the package is missing; it failed to import; it registered no
``torch.<type>``; the runtime refused (or, with no device, the driver's warning); no device is
visible (with ``visible_devices_env``); ``device_index`` is out of range. ``probe()`` never raises.

Everything else needs a device: called where there is none, it raises a one-line
:class:`~dsr1.errors.Dsr1Error` ``"<type> device is not available here: <reason>"``. The
``memory_fraction`` option (and whatever :meth:`VendorDevice.first_use` sets) is applied on the
first such call, never at construction.
"""
from __future__ import annotations

import os
import warnings
from importlib import import_module
from importlib.util import find_spec as _find_spec
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field

from dsr1.errors import Dsr1Error
from dsr1.interfaces import Device, MemoryInfo, ProbeResult
from dsr1_sdk.options import PluginOptions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["VendorDevice", "VendorOptions", "find_spec", "import_module", "one_line", "visible"]


class VendorOptions(PluginOptions):
    """Options every vendor device takes (unknown keys are refused)."""

    device_index: int = Field(0, ge=0, description="the device used when a method is given no index (unset: LOCAL_RANK "
                                                  "under a torchrun launch of several ranks, else 0)")
    memory_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="torch.<type>.set_per_process_memory_fraction on first use (None: no cap)",
    )


def find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` that answers ``None`` instead of raising."""
    try:
        return _find_spec(name)
    except (ImportError, ValueError):
        return None


def one_line(err: BaseException) -> str:
    """``"<Type>: <first line of the message>"``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def visible(env: str) -> str:
    """``"ENV='value'"`` or ``"ENV=unset"``."""
    value = os.environ.get(env)
    return f"{env}=unset" if value is None else f"{env}={value!r}"


class VendorDevice(Device):
    """A device driven through ``torch.<torch_device_type>``; see the module docstring."""

    Options: ClassVar[type[BaseModel]] = VendorOptions
    options: Any
    #: the vendor extension this plugin drives (``"torch_mlu"``).
    package: ClassVar[str] = ""
    #: who makes the runtime, as probe reasons name it (``"the Cambricon runtime refused: ..."``).
    vendor: ClassVar[str] = ""
    #: probe reason when ``package`` is not installed.
    missing: ClassVar[str] = ""
    #: what to check when ``package`` fails to import (in parentheses after the error).
    import_hint: ClassVar[str] = ""

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._ready: ProbeResult | None = None  # the first available probe, cached
        self._fraction_set: set[int] = set()

    # --- without a device -----------------------------------------------------------------

    def probe(self) -> ProbeResult:
        kind, label = self.torch_device_type, self.torch_device_type.upper()
        if find_spec(self.package) is None:
            return ProbeResult(available=False, reason=self.missing)
        with warnings.catch_warnings(record=True) as caught:  # driver libraries speak through warnings
            warnings.simplefilter("always")
            try:
                import_module(self.package)
            except Exception as err:  # noqa: BLE001 - a broken install is a reason, never a crash
                return ProbeResult(
                    available=False, reason=f"{self.package} failed to import: {one_line(err)} ({self.import_hint})"
                )
            module = self._module()
            if module is None:
                return ProbeResult(
                    available=False,
                    reason=f"{self.package} imported but registered no torch.{kind} (torch/{self.package} mismatch?)",
                )
            try:
                count = int(module.device_count())
            except Exception as err:  # noqa: BLE001 - the runtime's own words are the reason
                return ProbeResult(available=False, reason=f"the {self.vendor} runtime refused: {one_line(err)}")
        if count <= 0:
            driver = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            if driver:
                return ProbeResult(available=False, reason=f"the {self.vendor} driver refused: {driver[0]}")
            return ProbeResult(available=False, reason=f"no {label} device visible ({visible(self.visible_devices_env)})")
        if self.options.device_index >= count:
            return ProbeResult(
                available=False,
                reason=f"device_index {self.options.device_index} is out of range: {count} {label} device(s) visible "
                f"({visible(self.visible_devices_env)})",
            )
        return ProbeResult(available=True, reason=f"{count} {label} device(s) visible", device_count=count)

    # --- needing a device -----------------------------------------------------------------

    def _module(self) -> Any:
        import torch

        return getattr(torch, self.torch_device_type, None)

    def first_use(self, module: Any) -> None:
        """Settings applied once, when the first call that needs a device finds one (override)."""

    def runtime(self, index: int | None = None) -> Any:
        """``torch.<type>`` once a probe has said available; else a one-line :class:`Dsr1Error`.

        With an ``index``, ``memory_fraction`` is applied to that device on its first use.
        """
        if self._ready is None:
            result = self.probe()
            if not result.available:
                raise Dsr1Error(f"{self.torch_device_type} device is not available here: {result.reason}")
            self.first_use(self._module())
            self._ready = result
        module = self._module()
        if index is not None and self.options.memory_fraction is not None and index not in self._fraction_set:
            module.set_per_process_memory_fraction(self.options.memory_fraction, index)
            self._fraction_set.add(index)
        return module

    def _index(self, index: int | None) -> int:
        if index is not None:
            return index
        if "device_index" in self.options.model_fields_set:
            return int(self.options.device_index)
        return self.local_index()  # LOCAL_RANK under a launch of several ranks, else 0

    def device_count(self) -> int:
        return int(self.runtime().device_count())

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        """Free and total of the whole device (all processes), from ``torch.<type>.mem_get_info``."""
        i = self._index(index)
        free, total = self.runtime(i).mem_get_info(i)
        return MemoryInfo(total=int(total), free=int(free), used=int(total - free))

    def allocated(self, index: int | None = None) -> int:
        """Bytes held by this process's tensors (``torch.<type>.memory_allocated``)."""
        i = self._index(index)
        return int(self.runtime(i).memory_allocated(i))

    def synchronize(self, index: int | None = None) -> None:
        i = self._index(index)
        self.runtime(i).synchronize(i)

    def supported_dtypes(self) -> list[torch.dtype]:
        """fp32 and fp16 everywhere; bf16 where ``torch.<type>.is_bf16_supported()`` says so (an
        extension without that function gets no bf16)."""
        import torch

        module = self.runtime(self.options.device_index)
        dtypes = [torch.float32, torch.float16]
        is_bf16 = getattr(module, "is_bf16_supported", None)
        if is_bf16 is not None:
            with module.device(self.options.device_index):
                if is_bf16():
                    dtypes.insert(1, torch.bfloat16)
        return dtypes

    def torch_device(self, index: int | None = None) -> torch.device:
        import torch

        i = self._index(index)
        self.runtime(i)
        return torch.device(self.torch_device_type, i)

    def stream(self, index: int | None = None) -> Any:
        """A new ``torch.<type>.Stream`` on device ``index`` (capability ``streams``)."""
        i = self._index(index)
        return self.runtime(i).Stream(device=i)

    def event(self, enable_timing: bool = True) -> Any:
        """A ``torch.<type>.Event`` for timing and cross-stream waits (capability ``events``)."""
        return self.runtime().Event(enable_timing=enable_timing)

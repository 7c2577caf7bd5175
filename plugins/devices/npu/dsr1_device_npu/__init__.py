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
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import TYPE_CHECKING, Any, Literal

from dsr1_sdk import Device, Dsr1Error, Field, MemoryInfo, PluginOptions, PluginSpec, ProbeResult, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["MISSING", "NpuDevice", "NpuOptions", "dsr1_device"]

#: The vendor extension this plugin drives.
PACKAGE = "torch_npu"
#: Probe reason when the extension is not installed.
MISSING = (
    "torch_npu is not installed (pip install torch-npu matching your torch version; "
    "needs the Ascend driver and CANN toolkit)"
)


class NpuOptions(PluginOptions):
    """Options of the ``npu`` device."""

    device_index: int = Field(0, ge=0, description="the NPU used when a method is given no index")
    memory_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="torch.npu.set_per_process_memory_fraction on first use (None: no cap)",
    )
    compile_backend: Literal["npu", "inductor"] = Field(
        "npu",
        description="'npu': torchair (Ascend graph engine), registered by torch_npu; "
        "'inductor': torch_npu's inductor backend (needs triton-ascend)",
    )
    jit_compile: bool | None = Field(
        None, description="torch.npu.set_compile_mode(jit_compile=...) on first use (None: torch_npu's default)"
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


class NpuDevice(Device):
    """Huawei Ascend NPUs; see the module docstring."""

    Options = NpuOptions
    options: NpuOptions
    torch_device_type = "npu"
    collective_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def __init__(self, options: NpuOptions | None = None) -> None:
        super().__init__(options)
        self._ready: ProbeResult | None = None  # the first available probe, cached
        self._fraction_set: set[int] = set()

    # --- without a device -----------------------------------------------------------------

    def probe(self) -> ProbeResult:
        if _find_spec(PACKAGE) is None:
            return ProbeResult(available=False, reason=MISSING)
        with warnings.catch_warnings(record=True) as caught:  # ACL warnings carry the driver's words
            warnings.simplefilter("always")
            try:
                importlib.import_module(PACKAGE)
            except Exception as err:  # noqa: BLE001 - a broken install is a reason, never a crash
                return ProbeResult(
                    available=False,
                    reason=f"torch_npu failed to import: {_one_line(err)} (check the Ascend driver, the CANN "
                    "toolkit's set_env.sh and that torch_npu was built for this torch)",
                )
            npu = self._module()
            if npu is None:
                return ProbeResult(
                    available=False, reason="torch_npu imported but registered no torch.npu (torch/torch_npu mismatch?)"
                )
            try:
                count = int(npu.device_count())
            except Exception as err:  # noqa: BLE001 - the runtime's own words are the reason
                return ProbeResult(available=False, reason=f"the Ascend runtime refused: {_one_line(err)}")
        if count <= 0:
            driver = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            if driver:
                return ProbeResult(available=False, reason=f"the Ascend driver refused: {driver[0]}")
            return ProbeResult(available=False, reason=f"no NPU device visible ({_visible(self.visible_devices_env)})")
        if self.options.device_index >= count:
            return ProbeResult(
                available=False,
                reason=f"device_index {self.options.device_index} is out of range: {count} NPU device(s) visible "
                f"({_visible(self.visible_devices_env)})",
            )
        return ProbeResult(available=True, reason=f"{count} NPU device(s) visible", device_count=count)

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

    # --- needing a device -----------------------------------------------------------------

    @staticmethod
    def _module() -> Any:
        import torch

        return getattr(torch, "npu", None)

    def _npu(self, index: int | None = None) -> Any:
        """``torch.npu`` once a probe has said available; else a one-line :class:`Dsr1Error`."""
        if self._ready is None:
            result = self.probe()
            if not result.available:
                raise Dsr1Error(f"npu device is not available here: {result.reason}")
            npu = self._module()
            if self.options.jit_compile is not None:
                npu.set_compile_mode(jit_compile=self.options.jit_compile)
            self._ready = result
        npu = self._module()
        if index is not None and self.options.memory_fraction is not None and index not in self._fraction_set:
            npu.set_per_process_memory_fraction(self.options.memory_fraction, index)
            self._fraction_set.add(index)
        return npu

    def _index(self, index: int | None) -> int:
        return self.options.device_index if index is None else index

    def device_count(self) -> int:
        return int(self._npu().device_count())

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        """Free and total of the whole NPU (all processes), from ``torch.npu.mem_get_info``."""
        i = self._index(index)
        free, total = self._npu(i).mem_get_info(i)
        return MemoryInfo(total=int(total), free=int(free), used=int(total - free))

    def allocated(self, index: int | None = None) -> int:
        """Bytes held by this process's tensors (``torch.npu.memory_allocated``)."""
        i = self._index(index)
        return int(self._npu(i).memory_allocated(i))

    def synchronize(self, index: int | None = None) -> None:
        i = self._index(index)
        self._npu(i).synchronize(i)

    def supported_dtypes(self) -> list[torch.dtype]:
        """fp32 and fp16 everywhere; bf16 where ``torch.npu.is_bf16_supported()`` says so (910B and
        later; not the 910A or the 310P). A torch_npu without that function gets no bf16."""
        import torch

        npu = self._npu(self.options.device_index)
        dtypes = [torch.float32, torch.float16]
        is_bf16 = getattr(npu, "is_bf16_supported", None)
        if is_bf16 is not None:
            with npu.device(self.options.device_index):
                if is_bf16():
                    dtypes.insert(1, torch.bfloat16)
        return dtypes

    def torch_device(self, index: int | None = None) -> torch.device:
        import torch

        i = self._index(index)
        self._npu(i)
        return torch.device(self.torch_device_type, i)

    def stream(self, index: int | None = None) -> Any:
        """A new ``torch.npu.Stream`` on device ``index`` (capability ``streams``)."""
        i = self._index(index)
        return self._npu(i).Stream(device=i)

    def event(self, enable_timing: bool = True) -> Any:
        """A ``torch.npu.Event`` for timing and cross-stream waits (capability ``events``)."""
        return self._npu().Event(enable_timing=enable_timing)


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

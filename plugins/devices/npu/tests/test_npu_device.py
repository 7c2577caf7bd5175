"""The npu device plugin: the SDK's conformance kit (its hardware checks skip here with the
probe's reason), import hygiene, the probe's branches and the errors of an absent device.

The probe branches past "not installed" are reached with a stand-in ``torch_npu`` module
and ``torch.npu`` namespace put in place by monkeypatch for one test; nothing shipped
fakes a device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

import dsr1_device_npu
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_device_npu import MISSING, NpuDevice, NpuOptions
from dsr1_sdk.testing import DeviceConformance


class TestNpu(DeviceConformance):
    plugin = "npu"


class TestNpuWithOptions(DeviceConformance):
    plugin = "npu"
    options = {"device_index": 0, "memory_fraction": 0.5, "compile_backend": "inductor", "jit_compile": False}


# --- import hygiene ---------------------------------------------------------------------------

SENTINEL = "raise RuntimeError('sentinel torch_npu: imported, which the test forbids until probe()')\n"


def test_import_and_load_do_not_import_torch_npu(tmp_path: Path) -> None:
    """A sentinel ``torch_npu`` on the path fails loudly if anything imports it before probe()."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(SENTINEL)
    code = (
        "import json, sys\n"
        "import dsr1_device_npu\n"
        "from dsr1.registry import PluginRegistry\n"
        "spec = PluginRegistry().load('device', 'npu')\n"
        "device = spec.make({'memory_fraction': 0.5})\n"
        "before = {'torch_npu': 'torch_npu' in sys.modules, 'torch': 'torch' in sys.modules}\n"
        "result = device.probe()\n"
        "print(json.dumps({'before': before, 'available': result.available, 'reason': result.reason}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}  # test the plugin, not torch's backend autoload
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["before"] == {"torch_npu": False, "torch": False}
    # probe() did import it, and turned the failure into a reason instead of raising
    assert report["available"] is False
    assert report["reason"].startswith("torch_npu failed to import: RuntimeError: sentinel torch_npu")


# --- probe branches ---------------------------------------------------------------------------


def test_probe_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dsr1_device_npu, "_find_spec", lambda name: None)
    result = NpuDevice().probe()
    assert (result.available, result.reason, result.device_count) == (False, MISSING, 0)
    assert "torch_npu is not installed" in result.reason and "CANN" in result.reason and "torch-npu" in result.reason


@pytest.mark.skipif(dsr1_device_npu._find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_probe_here_says_not_installed() -> None:
    assert NpuDevice().probe() == dsr1_device_npu.ProbeResult(available=False, reason=MISSING)


def fake_torch_npu(monkeypatch: pytest.MonkeyPatch, count: Any = 0, warning: str = "", npu: bool = True) -> None:
    """Make ``import torch_npu`` succeed and ``torch.npu.device_count()`` answer ``count``
    (an exception instance is raised instead), for this test only."""

    def device_count() -> int:
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=1)
        if isinstance(count, BaseException):
            raise count
        return int(count)

    monkeypatch.setattr(dsr1_device_npu, "_find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "torch_npu", ModuleType("torch_npu"))
    if npu:
        monkeypatch.setattr(torch, "npu", SimpleNamespace(device_count=device_count), raising=False)
    else:
        monkeypatch.delattr(torch, "npu", raising=False)


def test_probe_when_import_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> ModuleType:
        raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(dsr1_device_npu, "_find_spec", lambda name: object())
    monkeypatch.setattr(dsr1_device_npu.importlib, "import_module", broken)
    result = NpuDevice().probe()
    assert not result.available
    assert result.reason.startswith("torch_npu failed to import: ImportError: libhccl.so: cannot open shared object")


def test_probe_when_torch_npu_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_npu(monkeypatch, npu=False)
    result = NpuDevice().probe()
    assert not result.available and "registered no torch.npu" in result.reason


def test_probe_with_no_device_names_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_npu(monkeypatch, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    assert NpuDevice().probe().reason == "no NPU device visible (ASCEND_RT_VISIBLE_DEVICES='')"
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    assert NpuDevice().probe().reason == "no NPU device visible (ASCEND_RT_VISIBLE_DEVICES=unset)"


def test_probe_quotes_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_npu(monkeypatch, count=RuntimeError("call aclrtGetDeviceCount failed, ERROR : 507033\nsecond line"))
    result = NpuDevice().probe()
    assert not result.available
    assert result.reason == "the Ascend runtime refused: RuntimeError: call aclrtGetDeviceCount failed, ERROR : 507033"


def test_probe_quotes_the_driver_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    warning = "Ascend driver not loaded (dsmi_get_device_count failed)"
    fake_torch_npu(monkeypatch, count=0, warning=warning)
    assert NpuDevice().probe().reason == f"the Ascend driver refused: {warning}"


def test_probe_checks_device_index(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_npu(monkeypatch, count=2)
    ok = NpuDevice().probe()
    assert (ok.available, ok.device_count) == (True, 2)
    out = NpuDevice(NpuOptions(device_index=2)).probe()
    assert not out.available and out.reason.startswith("device_index 2 is out of range: 2 NPU device(s) visible")


# --- without a device -------------------------------------------------------------------------

HARDWARE_CALLS = {
    "device_count": lambda d: d.device_count(),
    "memory_info": lambda d: d.memory_info(0),
    "allocated": lambda d: d.allocated(),
    "synchronize": lambda d: d.synchronize(0),
    "supported_dtypes": lambda d: d.supported_dtypes(),
    "torch_device": lambda d: d.torch_device(),
    "stream": lambda d: d.stream(),
    "event": lambda d: d.event(),
}


@pytest.mark.parametrize("call", sorted(HARDWARE_CALLS))
def test_hardware_methods_raise_one_line_error(call: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dsr1_device_npu, "_find_spec", lambda name: None)
    device = PluginRegistry().make("device", PluginChoice(name="npu", options={"memory_fraction": 0.5}))
    with pytest.raises(Dsr1Error) as info:
        HARDWARE_CALLS[call](device)
    assert str(info.value) == f"npu device is not available here: {MISSING}"


def test_class_attributes_and_compile_settings() -> None:
    assert (NpuDevice.torch_device_type, NpuDevice.collective_backend) == ("npu", "hccl")
    assert NpuDevice.visible_devices_env == "ASCEND_RT_VISIBLE_DEVICES"
    torchair = NpuDevice()
    assert torchair.compile_backend() == ("npu", {})
    assert torchair.autotune_settings("auto") == torchair.autotune_settings("fixed") == {}
    inductor = NpuDevice(NpuOptions(compile_backend="inductor"))
    assert inductor.compile_backend() == ("inductor", {})
    assert inductor.autotune_settings("auto") == {"mode": "max-autotune-no-cudagraphs"}
    assert inductor.autotune_settings("fixed") == {}
    with pytest.raises(Dsr1Error, match="tiling_strategy must be 'auto' or 'fixed', got 'fast'"):
        inductor.autotune_settings("fast")


BAD_OPTIONS = [{"memory_fraction": 0.0}, {"memory_fraction": 1.5}, {"device_index": -1}, {"compile_backend": "ge"}]


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_bad_options_are_one_line_errors(options: dict[str, Any]) -> None:
    with pytest.raises(Dsr1Error, match=f"device.options.{next(iter(options))}"):
        PluginRegistry().make("device", PluginChoice(name="npu", options=options))


def test_spec_declares_no_bf16_and_hccl() -> None:
    caps = PluginRegistry().load("device", "npu").capabilities
    assert {"fp16", "streams", "events", "collective:hccl", "compile:npu"} <= caps
    assert "bf16" not in caps  # the 910A and 310P have none; supported_dtypes() asks the card

"""The mlu device plugin: the SDK's conformance kit (its hardware checks skip here with the
probe's reason), import hygiene, the probe's branches and the errors of an absent device.

The probe branches past "not installed" are reached with a stand-in ``torch_mlu`` module
and ``torch.mlu`` namespace put in place by monkeypatch for one test; nothing shipped
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

import dsr1_device_mlu
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_device_mlu import MISSING, MluDevice, MluOptions
from dsr1_sdk.testing import DeviceConformance


class TestMlu(DeviceConformance):
    plugin = "mlu"


class TestMluWithOptions(DeviceConformance):
    plugin = "mlu"
    options = {"device_index": 0, "memory_fraction": 0.5, "inductor_options": {"epilogue_fusion": False}}


# --- import hygiene ---------------------------------------------------------------------------

SENTINEL = "raise RuntimeError('sentinel torch_mlu: imported, which the test forbids until probe()')\n"


def test_import_and_load_do_not_import_torch_mlu(tmp_path: Path) -> None:
    """A sentinel ``torch_mlu`` on the path fails loudly if anything imports it before probe()."""
    (tmp_path / "torch_mlu").mkdir()
    (tmp_path / "torch_mlu" / "__init__.py").write_text(SENTINEL)
    code = (
        "import json, sys\n"
        "import dsr1_device_mlu\n"
        "from dsr1.registry import PluginRegistry\n"
        "spec = PluginRegistry().load('device', 'mlu')\n"
        "device = spec.make({'memory_fraction': 0.5})\n"
        "before = {'torch_mlu': 'torch_mlu' in sys.modules, 'torch': 'torch' in sys.modules}\n"
        "result = device.probe()\n"
        "print(json.dumps({'before': before, 'available': result.available, 'reason': result.reason}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}  # test the plugin, not torch's backend autoload
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["before"] == {"torch_mlu": False, "torch": False}
    # probe() did import it, and turned the failure into a reason instead of raising
    assert report["available"] is False
    assert report["reason"].startswith("torch_mlu failed to import: RuntimeError: sentinel torch_mlu")


# --- probe branches ---------------------------------------------------------------------------


def test_probe_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dsr1_device_mlu, "_find_spec", lambda name: None)
    result = MluDevice().probe()
    assert (result.available, result.reason, result.device_count) == (False, MISSING, 0)
    assert "torch_mlu is not installed" in result.reason and "CNToolkit" in result.reason


@pytest.mark.skipif(dsr1_device_mlu._find_spec("torch_mlu") is not None, reason="torch_mlu is installed here")
def test_probe_here_says_not_installed() -> None:
    assert MluDevice().probe() == dsr1_device_mlu.ProbeResult(available=False, reason=MISSING)


def fake_torch_mlu(monkeypatch: pytest.MonkeyPatch, count: Any = 0, warning: str = "", mlu: bool = True) -> None:
    """Make ``import torch_mlu`` succeed and ``torch.mlu.device_count()`` answer ``count``
    (an exception instance is raised instead), for this test only."""

    def device_count() -> int:
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=1)
        if isinstance(count, BaseException):
            raise count
        return int(count)

    monkeypatch.setattr(dsr1_device_mlu, "_find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "torch_mlu", ModuleType("torch_mlu"))
    if mlu:
        monkeypatch.setattr(torch, "mlu", SimpleNamespace(device_count=device_count), raising=False)
    else:
        monkeypatch.delattr(torch, "mlu", raising=False)


def test_probe_when_import_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> ModuleType:
        raise OSError("libcnrt.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(dsr1_device_mlu, "_find_spec", lambda name: object())
    monkeypatch.setattr(dsr1_device_mlu.importlib, "import_module", broken)
    result = MluDevice().probe()
    assert not result.available
    assert result.reason.startswith("torch_mlu failed to import: OSError: libcnrt.so: cannot open shared object")


def test_probe_when_torch_mlu_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_mlu(monkeypatch, mlu=False)
    result = MluDevice().probe()
    assert not result.available and "registered no torch.mlu" in result.reason


def test_probe_with_no_device_names_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_mlu(monkeypatch, count=0)
    monkeypatch.setenv("MLU_VISIBLE_DEVICES", "")
    assert MluDevice().probe().reason == "no MLU device visible (MLU_VISIBLE_DEVICES='')"
    monkeypatch.delenv("MLU_VISIBLE_DEVICES")
    assert MluDevice().probe().reason == "no MLU device visible (MLU_VISIBLE_DEVICES=unset)"


def test_probe_quotes_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_mlu(monkeypatch, count=RuntimeError("CNRT error: no MLU device driver found\nsecond line"))
    result = MluDevice().probe()
    assert not result.available
    assert result.reason == "the Cambricon runtime refused: RuntimeError: CNRT error: no MLU device driver found"


def test_probe_quotes_the_driver_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_mlu(monkeypatch, count=0, warning="Can't initialize CNDEV")
    assert MluDevice().probe().reason == "the Cambricon driver refused: Can't initialize CNDEV"


def test_probe_checks_device_index(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch_mlu(monkeypatch, count=2)
    ok = MluDevice().probe()
    assert (ok.available, ok.device_count) == (True, 2)
    out = MluDevice(MluOptions(device_index=2)).probe()
    assert not out.available and out.reason.startswith("device_index 2 is out of range: 2 MLU device(s) visible")


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
    monkeypatch.setattr(dsr1_device_mlu, "_find_spec", lambda name: None)
    device = PluginRegistry().make("device", PluginChoice(name="mlu", options={"memory_fraction": 0.5}))
    with pytest.raises(Dsr1Error) as info:
        HARDWARE_CALLS[call](device)
    assert str(info.value) == f"mlu device is not available here: {MISSING}"


def test_class_attributes_and_compile_settings() -> None:
    assert (MluDevice.torch_device_type, MluDevice.collective_backend) == ("mlu", "cncl")
    assert MluDevice.visible_devices_env == "MLU_VISIBLE_DEVICES"
    device = MluDevice(MluOptions(inductor_options={"epilogue_fusion": False}))
    assert device.compile_backend() == ("inductor", {"epilogue_fusion": False})
    assert device.autotune_settings("auto") == {"mode": "max-autotune-no-cudagraphs"}
    assert device.autotune_settings("fixed") == {"max_autotune": False, "max_autotune_pointwise": False}
    with pytest.raises(Dsr1Error, match="tiling_strategy must be 'auto' or 'fixed', got 'fast'"):
        device.autotune_settings("fast")


@pytest.mark.parametrize("options", [{"memory_fraction": 0.0}, {"memory_fraction": 1.5}, {"device_index": -1}])
def test_bad_options_are_one_line_errors(options: dict[str, Any]) -> None:
    with pytest.raises(Dsr1Error, match=f"device.options.{next(iter(options))}"):
        PluginRegistry().make("device", PluginChoice(name="mlu", options=options))


def test_spec_declares_no_bf16_and_cncl() -> None:
    caps = PluginRegistry().load("device", "mlu").capabilities
    assert {"fp16", "streams", "events", "collective:cncl", "compile:inductor"} <= caps
    assert "bf16" not in caps  # the MLU370 has none in torch_mlu; supported_dtypes() asks the card

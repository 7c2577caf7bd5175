"""The npu device plugin: the SDK's vendor-device kit (its hardware checks skip here with the
probe's reason; import hygiene, every probe branch and the errors of an absent device are
checked with stand-ins for ``torch_npu``), plus what is the NPU's own: class attributes,
compile settings, options and capabilities.
"""
from __future__ import annotations

from typing import Any

import pytest

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_device_npu import NpuDevice, NpuOptions
from dsr1_sdk.testing import DeviceConformance, VendorDeviceConformance


class TestNpu(VendorDeviceConformance):
    plugin = "npu"
    missing_words = ("torch_npu is not installed", "CANN", "torch-npu")
    import_error = ImportError("libhccl.so: cannot open shared object file: No such file or directory")
    runtime_error = RuntimeError("call aclrtGetDeviceCount failed, ERROR : 507033")
    driver_warning = "Ascend driver not loaded (dsmi_get_device_count failed)"


class TestNpuWithOptions(DeviceConformance):
    plugin = "npu"
    options = {"device_index": 0, "memory_fraction": 0.5, "compile_backend": "inductor", "jit_compile": False}


def test_class_attributes_and_compile_settings() -> None:
    assert (NpuDevice.torch_device_type, NpuDevice.collective_backend) == ("npu", "hccl")
    assert (NpuDevice.package, NpuDevice.vendor, NpuDevice.visible_devices_env) == (
        "torch_npu", "Ascend", "ASCEND_RT_VISIBLE_DEVICES")
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

"""The mlu device plugin: the SDK's vendor-device kit (its hardware checks skip here with the
probe's reason; import hygiene, every probe branch and the errors of an absent device are
checked with stand-ins for ``torch_mlu``), plus what is the MLU's own: class attributes,
compile settings, options and capabilities.
"""
from __future__ import annotations

from typing import Any

import pytest

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_device_mlu import MluDevice, MluOptions
from dsr1_sdk.testing import DeviceConformance, VendorDeviceConformance


class TestMlu(VendorDeviceConformance):
    plugin = "mlu"
    missing_words = ("torch_mlu is not installed", "CNToolkit")
    import_error = OSError("libcnrt.so: cannot open shared object file: No such file or directory")
    runtime_error = RuntimeError("CNRT error: no MLU device driver found")
    driver_warning = "Can't initialize CNDEV"


class TestMluWithOptions(DeviceConformance):
    plugin = "mlu"
    options = {"device_index": 0, "memory_fraction": 0.5, "inductor_options": {"epilogue_fusion": False}}


def test_class_attributes_and_compile_settings() -> None:
    assert (MluDevice.torch_device_type, MluDevice.collective_backend) == ("mlu", "cncl")
    assert (MluDevice.package, MluDevice.vendor, MluDevice.visible_devices_env) == (
        "torch_mlu", "Cambricon", "MLU_VISIBLE_DEVICES")
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

"""The cuda device plugin: the SDK's conformance kit (hardware checks run where a GPU is)
plus probe reasons simulated on any machine."""
from __future__ import annotations

import warnings

import pytest
import torch

from dsr1.config import PluginChoice
from dsr1.registry import PluginRegistry
from dsr1_device_cuda import CudaDevice, CudaOptions
from dsr1_sdk.testing import DeviceConformance


class TestCuda(DeviceConformance):
    plugin = "cuda"


class TestCudaWithGraphs(DeviceConformance):
    plugin = "cuda"
    options = {"cudagraphs": True, "inductor_options": {"max_autotune_gemm": True}}


def fake_cuda(monkeypatch: pytest.MonkeyPatch, built: bool, available: bool, count: int, warning: str = "") -> None:
    def is_available() -> bool:
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=1)
        return available

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_reason_when_torch_has_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, built=False, available=False, count=0)
    result = CudaDevice().probe()
    assert not result.available and "built without CUDA" in result.reason


def test_reason_names_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, built=True, available=False, count=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = CudaDevice().probe()
    assert not result.available and result.reason == "no CUDA device visible (CUDA_VISIBLE_DEVICES='')"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES=unset" in CudaDevice().probe().reason


def test_reason_quotes_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    message = "CUDA initialization: The NVIDIA driver on your system is too old (found version 11000)."
    fake_cuda(monkeypatch, built=True, available=False, count=0, warning=message)
    result = CudaDevice().probe()
    assert not result.available and result.reason == f"the CUDA driver refused: {message}"


def test_available_reports_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, built=True, available=True, count=8)
    result = CudaDevice().probe()
    assert result.available and result.device_count == 8


def test_compile_and_autotune_options() -> None:
    options = {"cudagraphs": True, "inductor_options": {"epilogue_fusion": False}}
    device = PluginRegistry().make("device", PluginChoice(name="cuda", options=options))
    assert device.compile_backend() == ("inductor", {"triton.cudagraphs": True, "epilogue_fusion": False})
    assert device.autotune_settings("auto") == {"mode": "max-autotune"}
    assert CudaDevice().autotune_settings("auto") == {"mode": "max-autotune-no-cudagraphs"}
    assert CudaDevice().autotune_settings("fixed") == {}
    assert (CudaDevice.collective_backend, CudaDevice.visible_devices_env) == ("nccl", "CUDA_VISIBLE_DEVICES")


def test_matmul_precision_option(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    CudaDevice(CudaOptions(matmul_precision="high"))
    assert seen == ["high"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streams_and_events_on_gpu() -> None:
    device = CudaDevice()
    stream, start, end = device.stream(), device.event(), device.event()
    with torch.cuda.stream(stream):
        start.record()
        x = torch.randn(256, 256, device="cuda") @ torch.randn(256, 256, device="cuda")
        end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0 and x.shape == (256, 256)
    assert device.compute_capability() >= (7, 0)

"""The cpu device plugin: the SDK's conformance kit plus its memory sources and options."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dsr1_device_cpu
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_sdk.testing import DeviceConformance


class TestCpu(DeviceConformance):
    plugin = "cpu"


class TestCpuOneThread(DeviceConformance):
    plugin = "cpu"
    options = {"threads": 1}


@pytest.fixture(autouse=True)
def _keep_threads() -> object:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_option_sets_torch_threads() -> None:
    PluginRegistry().make("device", PluginChoice(name="cpu", options={"threads": 1}))
    assert torch.get_num_threads() == 1


def test_threads_must_be_positive() -> None:
    with pytest.raises(Dsr1Error, match="device.options.threads"):
        PluginRegistry().make("device", PluginChoice(name="cpu", options={"threads": 0}))


def test_meminfo_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    9000000 kB\n")
    assert dsr1_device_cpu._meminfo(meminfo) == (16000000 * 1024, 9000000 * 1024)
    assert dsr1_device_cpu._meminfo(tmp_path / "missing") is None
    monkeypatch.setattr(dsr1_device_cpu, "MEMINFO", meminfo)
    monkeypatch.setattr(dsr1_device_cpu, "CGROUP", tmp_path / "no-cgroup")
    info = dsr1_device_cpu.read_memory()
    assert (info.total, info.free, info.used) == (16000000 * 1024, 9000000 * 1024, 7000000 * 1024)


def test_cgroup_limit_caps_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "memory.max").write_text("4096\n")
    (tmp_path / "memory.current").write_text("1024\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    9000000 kB\n")
    monkeypatch.setattr(dsr1_device_cpu, "MEMINFO", meminfo)
    monkeypatch.setattr(dsr1_device_cpu, "CGROUP", tmp_path)
    info = dsr1_device_cpu.read_memory()
    assert (info.total, info.free, info.used) == (4096, 3072, 1024)
    (tmp_path / "memory.max").write_text("max\n")
    assert dsr1_device_cpu._cgroup_limit(tmp_path) is None

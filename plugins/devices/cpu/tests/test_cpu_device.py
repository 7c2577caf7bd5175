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



class _RecordingLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def _cpu(monkeypatch: pytest.MonkeyPatch, libc: object, **options: object) -> object:
    monkeypatch.setattr(dsr1_device_cpu, "glibc", lambda: libc)
    return PluginRegistry().make("device", PluginChoice(name="cpu", options=options))


def test_relayout_returns_freed_buffers_then_restores_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _RecordingLibc()
    device = _cpu(monkeypatch, libc)
    assert libc.calls == []  # building the device leaves the allocator alone
    with device.relayout_memory():
        assert libc.calls == [(dsr1_device_cpu.M_MMAP_THRESHOLD, 2**20), (dsr1_device_cpu.M_TRIM_THRESHOLD, 2**21)]
    assert libc.calls[2:] == [(dsr1_device_cpu.M_MMAP_THRESHOLD, 32 * 2**20), (dsr1_device_cpu.M_TRIM_THRESHOLD, 64 * 2**20)]
    with pytest.raises(RuntimeError, match="inside"), device.relayout_memory():
        raise RuntimeError("inside")
    assert libc.calls[-2:] == [(dsr1_device_cpu.M_MMAP_THRESHOLD, 32 * 2**20), (dsr1_device_cpu.M_TRIM_THRESHOLD, 64 * 2**20)]


def test_return_freed_weights_off_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _RecordingLibc()
    with _cpu(monkeypatch, libc, return_freed_weights=False).relayout_memory():
        pass
    assert libc.calls == []


def test_return_freed_weights_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    with _cpu(monkeypatch, None).relayout_memory():  # the default: nothing to do, no error
        pass
    with pytest.raises(Dsr1Error, match="return_freed_weights needs glibc.*set it to false"):
        _cpu(monkeypatch, None, return_freed_weights=True)
    device = _cpu(monkeypatch, _RecordingLibc(result=0))  # glibc refuses mallopt
    with pytest.raises(Dsr1Error, match="glibc refused mallopt"), device.relayout_memory():
        pass


@pytest.mark.skipif(dsr1_device_cpu.glibc() is None, reason="glibc only")
def test_glibc_takes_both_thresholds() -> None:
    libc = dsr1_device_cpu.glibc()
    dsr1_device_cpu.set_mmap_threshold(libc, dsr1_device_cpu.RELAYOUT_MMAP_BYTES)  # raises unless glibc took it
    dsr1_device_cpu.set_mmap_threshold(libc, dsr1_device_cpu.COMPUTE_MMAP_BYTES)

"""Where the panel kernel is cached, and the stderr line that every build prints.

torch's compiler is replaced by a fake that writes the library, so these run on any CPU in no time;
``test_panels.py`` builds the real kernel where it can run.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import cpp_extension

from dsr1_device_cpu import panels
from dsr1_sdk.kernels import cpu as cpu_kernels

OLD = 1_000_000_000.0  # a fixed mtime, long ago: what a finished build leaves


class FakeCompiler:
    """``cpp_extension.load`` that 'builds' when ninja would: library missing or older than its source."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.force = False  # rebuild whatever the mtimes say (a cause dsr1 does not foresee)

    def __call__(self, name: str, sources: list[str], build_directory: str, **kw: Any) -> str:
        self.calls.append({"name": name, "sources": sources, "build_directory": build_directory, **kw})
        lib, src = Path(build_directory) / f"{name}.so", Path(sources[0])
        if self.force or not lib.exists() or src.stat().st_mtime > lib.stat().st_mtime:
            lib.write_bytes(b"built from " + src.read_bytes())
            os.utime(src, (OLD - 10, OLD - 10))
            os.utime(lib, (OLD + 1, OLD + 1) if self.force else (OLD, OLD))
        return f"module from {build_directory}"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeCompiler]:
    compiler = FakeCompiler()
    monkeypatch.setattr(cpp_extension, "load", compiler)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_put_ninja_on_path", lambda: None)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "home"))
    source = tmp_path / "panel_gemm.cpp"
    source.write_text("// version 1\n")
    monkeypatch.setattr(panels, "SOURCE", source)
    panels._kernels.cache_clear()
    yield compiler
    panels._kernels.cache_clear()


def build(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Load the kernel in a 'new process' (the in-process cache cleared); the stderr lines it printed."""
    panels._kernels.cache_clear()
    panels._kernels()
    return capsys.readouterr().err.splitlines()


def test_cache_is_keyed_by_torch_build_under_dsr1_home_or_torch_extensions_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "home"))
    key = cpu_kernels.build_key()
    assert panels.build_directory() == tmp_path / "home" / "kernels" / panels.NAME / key
    assert key.startswith(f"torch-{torch.__version__}-{(torch.version.git_version or 'unknown')[:12]}-")
    assert f"-cxx11abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}-{sys.implementation.cache_tag}-" in key
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert panels.build_directory() == tmp_path / "ext" / panels.NAME / key
    # another environment's torch of the same build: its own directory (the build commands name its includes)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    other = cpu_kernels.build_key()
    assert other != key and other.rsplit("-", 1)[0] == key.rsplit("-", 1)[0]


def test_every_build_prints_one_line_and_a_cached_kernel_prints_nothing(
    fake: FakeCompiler, capsys: pytest.CaptureFixture[str]
) -> None:
    where = panels.build_directory()
    lines = build(capsys)
    assert lines == [f"dsr1: building the cpu device's panel kernel (once per torch build, about 25 s) in {where}"]
    call = fake.calls[-1]
    assert call["build_directory"] == str(where) and call["sources"] == [str(where / "panel_gemm.cpp")]
    assert (where / f"{panels.NAME}.so").is_file()
    assert build(capsys) == []  # cached: silent

    os.utime(panels.SOURCE)  # a reinstalled plugin: a newer file, the same text
    assert build(capsys) == []
    assert (where / "panel_gemm.cpp").stat().st_mtime == OLD - 10  # the staged copy was left alone

    panels.SOURCE.write_text("// version 2\n")  # a new plugin version: rebuilt, and said
    assert build(capsys) == [lines[0]]
    assert (where / f"{panels.NAME}.so").read_bytes() == b"built from // version 2\n"


def test_a_rebuild_nobody_foresaw_is_still_reported(fake: FakeCompiler, capsys: pytest.CaptureFixture[str]) -> None:
    build(capsys)
    fake.force = True
    assert build(capsys) == [f"dsr1: rebuilt the cpu device's panel kernel in {panels.build_directory()}"]


def test_another_torch_build_gets_its_own_directory(
    fake: FakeCompiler, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = panels.build_directory()
    build(capsys)
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    assert panels.build_directory() != first
    assert len(build(capsys)) == 1 and fake.calls[-1]["build_directory"] == str(panels.build_directory())


def test_build_ahead_skips_cpus_that_cannot_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert panels.build() == "panel kernel not built: it needs AVX-512 and this CPU offers AVX2"
    assert panels.main(["--where"]) == 0

"""The cpu device's panel kernel for fp32 linear layers, and the ``linear_kernel`` option."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dsr1_device_cpu
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_device_cpu import panels
from dsr1_device_cpu.panels import PanelLinear
from dsr1_sdk.kernels import cpu as cpu_kernels

REASON = panels.unavailable()
needs_panels = pytest.mark.skipif(REASON is not None, reason=f"panel kernel: {REASON}")


def _linear(k: int, n: int, bias: bool, kn: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    if kn:  # the engine's CPU load layout: (in, out) storage, the weight its (out, in) view
        layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())
    return layer


@needs_panels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 130), n=st.integers(1, 200), bias=st.booleans(), kn=st.booleans())
def test_panel_matmul_matches_the_reference(rows: int, k: int, n: int, bias: bool, kn: bool) -> None:
    layer = _linear(k, n, bias, kn)
    packed = panels.pack_linear(layer)
    x = torch.randn(rows, k)
    torch.testing.assert_close(packed(x), layer(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.dense_weight(), layer.weight)  # the layout round-trips bit for bit


@needs_panels
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 14])  # panel pairs (1-2 rows), one pass (3-8), 6-row tiles
@pytest.mark.parametrize("n", [64, 130, 192, 200])  # whole pairs, an odd last panel, partial panels
def test_every_kernel_path(rows: int, n: int) -> None:
    layer = _linear(70, n, bias=True, kn=True, seed=rows)
    x = torch.randn(rows, 70)
    torch.testing.assert_close(panels.pack_linear(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


@needs_panels
def test_panel_linear_takes_any_leading_shape_and_strided_input() -> None:
    layer = _linear(96, 130, bias=True, kn=True)
    packed = panels.pack_linear(layer)
    x = torch.randn(5, 3, 2 * 96)[..., ::2]  # (5, 3, 96), not contiguous
    out = packed(x)
    assert out.shape == (5, 3, 130)
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(Dsr1Error, match="float32 on the CPU"):
        packed(x.double())


@needs_panels
def test_panel_linear_state_dict_is_the_plain_layer() -> None:
    layer = _linear(40, 70, bias=True, kn=False)
    packed = panels.pack_linear(layer)
    state = packed.state_dict()
    assert list(state) == ["weight", "bias"]
    assert torch.equal(state["weight"], layer.weight) and torch.equal(state["bias"], layer.bias)
    assert packed.panels.shape == (2, 40, panels.PANEL)  # 70 outputs: two 64-column panels, zero-padded
    assert not packed.panels[1, :, 70 - 64 :].any()


@needs_panels
def test_panel_kernel_uses_torch_threads() -> None:
    layer = _linear(256, 512, bias=False, kn=False)
    packed = panels.pack_linear(layer)
    x = torch.randn(8, 256)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(packed(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])  # panels are split across threads, never a row's sum


def _device(**options: object) -> dsr1_device_cpu.CpuDevice:
    return PluginRegistry().make("device", PluginChoice(name="cpu", options=options))


@needs_panels
def test_pack_linear_follows_the_option() -> None:
    layer = _linear(16, 24, bias=False, kn=False)
    assert isinstance(_device().pack_linear(layer), PanelLinear)  # auto, where the kernel runs
    assert isinstance(_device(linear_kernel="panels").pack_linear(layer), PanelLinear)
    assert _device(linear_kernel="none").pack_linear(layer) is None
    assert _device().pack_linear(layer.double()) is None  # fp32 only
    assert _device().pack_linear(nn.Identity()) is None


def test_pack_linear_where_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(panels, "unavailable", lambda: "the panel kernel needs AVX-512 and this CPU offers AVX2")
    layer = _linear(16, 24, bias=False, kn=False)
    with pytest.raises(Dsr1Error, match="linear_kernel 'panels' cannot run here: .*needs AVX-512"):
        _device(linear_kernel="panels").pack_linear(layer)
    dsr1_device_cpu._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="keep MKL/oneDNN, not the panel kernel: .*set linear_kernel: none"):
        assert _device().pack_linear(layer) is None  # auto: the model's own layout, said out loud


def test_unknown_linear_kernel_is_one_line() -> None:
    with pytest.raises(Dsr1Error, match="device.options.linear_kernel"):
        _device(linear_kernel="pannels")


@needs_panels
def test_large_panels_start_on_a_huge_page_boundary() -> None:
    big = panels.pack_linear(_linear(512, 1100, bias=False, kn=True))  # 18 panels x 512 x 64 floats: 2.25 MiB
    assert big.panels.data_ptr() % (2 << 20) == 0 and big.panels.is_contiguous()
    x = torch.randn(3, 512)
    torch.testing.assert_close(big(x), x @ big.dense_weight().t(), atol=1e-5, rtol=1e-5)
    small = panels.pack_linear(_linear(64, 64, bias=False, kn=False))  # 16 KiB: no slack spent on it
    assert small.panels.untyped_storage().nbytes() == small.panels.nbytes


def test_ninja_beside_the_interpreter_is_found_without_an_activated_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cpu_kernels._put_ninja_on_path()  # shared by every kernel the SDK and the cpu device build
    first = os.environ["PATH"].split(os.pathsep)[0]
    assert first != "/nonexistent" and Path(first).is_dir()

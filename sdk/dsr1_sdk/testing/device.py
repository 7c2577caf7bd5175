"""Device conformance: probing without side effects, then the hardware contract.

``probe()`` must return a :class:`ProbeResult` without raising. When the device is not
available here, its ``reason`` is a non-empty sentence, probing started no runtime, and
every check that needs hardware is skipped with that reason (never called). When it is
available: ``device_count``, ``memory_info`` (``total == free + used``), ``synchronize``,
``supported_dtypes`` and a small matmul on ``torch_device()`` compared with float64 on CPU.
"""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from dsr1.interfaces import Device, ProbeResult
from dsr1_sdk.reference.device import check_memory_info, matmul
from dsr1_sdk.testing.base import PluginConformance
from dsr1_sdk.testing.isolation import import_report, runtime_problems
from dsr1_sdk.testing.tolerances import DEVICE_TOLERANCES, close_problem, dtype_name


def check_probe(result: object) -> ProbeResult:
    """A well-formed :class:`ProbeResult`: unavailable ones say why."""
    assert isinstance(result, ProbeResult), f"probe() returned {type(result).__name__}, not a ProbeResult"
    assert isinstance(result.available, bool), f"available is {result.available!r}, expected bool"
    assert isinstance(result.device_count, int) and result.device_count >= 0
    if not result.available:
        assert isinstance(result.reason, str) and result.reason.strip(), "an unavailable device must say why"
    else:
        assert result.device_count >= 1, "an available device reports device_count >= 1"
    return result


def check_matmul(device: Device, dtype: torch.dtype, index: int = 0,
                 tolerances: dict[str, tuple[float, float]] = DEVICE_TOLERANCES) -> None:
    """``(M, K) @ (K, N)`` on the device equals float64 CPU within the dtype's tolerance."""
    gen = torch.Generator().manual_seed(0)
    k = 48
    a = (torch.randn(64, k, generator=gen) / k**0.25).to(dtype)  # (M, K), unit-variance products
    b = (torch.randn(k, 32, generator=gen) / k**0.25).to(dtype)  # (K, N)
    target = device.torch_device(index)
    out = a.to(target) @ b.to(target)  # (M, N)
    device.synchronize(index)
    assert out.device.type == device.torch_device_type, f"result on {out.device}, expected {device.torch_device_type}"
    atol, rtol = tolerances.get(dtype_name(dtype), (1e-2, 1e-2))
    problem = close_problem(out.cpu(), matmul(a, b), atol, rtol, f"{dtype_name(dtype)} matmul on {target}")
    assert problem is None, problem


class DeviceConformance(PluginConformance):
    """Conformance kit of the ``device`` family. Subclass it and set ``plugin``."""

    family: ClassVar[str] = "device"
    tolerances: ClassVar[dict[str, tuple[float, float]]] = DEVICE_TOLERANCES

    def available_impl(self) -> Device:
        """An instance whose probe says available; skips with the probe's reason otherwise."""
        impl: Device = self.make_impl()
        result = check_probe(impl.probe())
        if not result.available:
            pytest.skip(f"{self.plugin} not available here: {result.reason}")
        return impl

    # --- without hardware -------------------------------------------------------------

    def test_probe_returns_result_without_raising(self) -> None:
        check_probe(self.make_impl().probe())

    def test_probe_starts_no_runtime_when_unavailable(self) -> None:
        report = import_report(self.family, self.plugin, self.options, probe=True)
        available = report["probe"]["available"]
        when = "probe() of an available device" if available else "probe() of an unavailable device"
        problems = runtime_problems(report["after_probe"], report["device_type"], when, allow_own=available)
        assert not problems, "; ".join(problems)

    def test_class_attributes(self) -> None:
        impl = self.make_impl()
        assert isinstance(impl.torch_device_type, str) and impl.torch_device_type
        assert isinstance(impl.collective_backend, str) and impl.collective_backend
        assert isinstance(impl.visible_devices_env, str)

    def test_compile_and_autotune_settings(self) -> None:
        impl = self.make_impl()
        backend = impl.compile_backend()
        assert isinstance(backend, tuple) and len(backend) == 2, f"compile_backend() returned {backend!r}"
        assert isinstance(backend[0], str) and backend[0] and isinstance(backend[1], dict)
        for strategy in ("auto", "fixed"):
            assert isinstance(impl.autotune_settings(strategy), dict)

    # --- with hardware ----------------------------------------------------------------

    def test_device_count(self) -> None:
        impl = self.available_impl()
        count = impl.device_count()
        assert isinstance(count, int) and count >= 1, f"device_count() is {count!r}"
        assert impl.probe().device_count in (0, count), "probe().device_count disagrees with device_count()"

    def test_memory_info(self) -> None:
        impl = self.available_impl()
        for index in range(impl.device_count()):
            problems = check_memory_info(impl.memory_info(index))
            assert not problems, f"memory_info({index}): " + "; ".join(problems)

    def test_synchronize(self) -> None:
        impl = self.available_impl()
        for index in range(impl.device_count()):
            assert impl.synchronize(index) is None

    def test_supported_dtypes(self) -> None:
        dtypes = self.available_impl().supported_dtypes()
        assert isinstance(dtypes, list) and dtypes, "supported_dtypes() must list at least one dtype"
        assert all(isinstance(d, torch.dtype) for d in dtypes), f"not all torch dtypes: {dtypes}"
        assert torch.float32 in dtypes, "every device runs float32"

    def test_torch_device(self) -> None:
        impl = self.available_impl()
        target = impl.torch_device(0)
        assert isinstance(target, torch.device) and target.type == impl.torch_device_type
        assert torch.zeros(2, device=target).device.type == impl.torch_device_type

    @pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
    def test_matmul_matches_cpu(self, dtype: str) -> None:
        impl = self.available_impl()
        from dsr1_sdk.testing.tolerances import DTYPES

        if DTYPES[dtype] not in impl.supported_dtypes():
            pytest.skip(f"{self.plugin} does not list {dtype} in supported_dtypes()")
        for index in range(impl.device_count()):
            check_matmul(impl, DTYPES[dtype], index, self.tolerances)

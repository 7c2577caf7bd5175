"""Device conformance: probing without side effects, then the hardware contract.

``probe()`` must return a :class:`ProbeResult` without raising. When the device is not
available here, its ``reason`` is a non-empty sentence, probing started no runtime, and
every check that needs hardware is skipped with that reason (never called). When it is
available: ``device_count``, ``memory_info`` (``total == free + used``), ``synchronize``,
``supported_dtypes`` and a small matmul on ``torch_device()`` compared with float64 on CPU.

:class:`VendorDeviceConformance` adds what a :class:`~dsr1_sdk.VendorDevice` plugin
(``torch_mlu``, ``torch_npu`` ...) must do where its extension is absent or broken.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from dsr1.errors import Dsr1Error
from dsr1.interfaces import Device, ProbeResult
from dsr1_sdk import vendor
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
        if backend is not None:  # None: the device declares no compile backend
            assert isinstance(backend, tuple) and len(backend) == 2, f"compile_backend() returned {backend!r}"
            assert isinstance(backend[0], str) and backend[0] and isinstance(backend[1], dict)
        for strategy in ("auto", "fixed"):
            assert isinstance(impl.autotune_settings(strategy), dict)

    def test_relayout_memory_is_a_scope_that_propagates_errors(self) -> None:
        impl = self.make_impl()
        with impl.relayout_memory():
            pass
        with pytest.raises(KeyError, match="raised inside"), impl.relayout_memory():
            raise KeyError("raised inside")
        with impl.relayout_memory():  # usable again after an error
            pass

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


# --- devices over a vendor's torch extension (dsr1_sdk.VendorDevice) ----------------------------

#: Every method of a :class:`~dsr1_sdk.VendorDevice` that needs a device, called the simplest way.
HARDWARE_CALLS: dict[str, Callable[[Any], Any]] = {
    "device_count": lambda d: d.device_count(),
    "memory_info": lambda d: d.memory_info(0),
    "allocated": lambda d: d.allocated(),
    "synchronize": lambda d: d.synchronize(0),
    "supported_dtypes": lambda d: d.supported_dtypes(),
    "torch_device": lambda d: d.torch_device(),
    "stream": lambda d: d.stream(),
    "event": lambda d: d.event(),
}


class VendorDeviceConformance(DeviceConformance):
    """The device kit plus the contract of a :class:`~dsr1_sdk.VendorDevice` plugin, checked where the
    vendor extension is absent: import hygiene (a sentinel extension in a subprocess), every probe branch
    (a stand-in extension module and ``torch.<type>`` namespace put in place by monkeypatch for one
    test; nothing shipped fakes a device) and the one-line errors of every hardware method.

    Set, besides ``plugin``, the vendor's own words for the stand-ins::

        class TestMlu(VendorDeviceConformance):
            plugin = "mlu"
            missing_words = ("CNToolkit",)
            import_error = OSError("libcnrt.so: cannot open shared object file: No such file or directory")
            runtime_error = RuntimeError("CNRT error: no MLU device driver found")
            driver_warning = "Can't initialize CNDEV"
    """

    #: words the "not installed" reason must contain (what to install, what it needs).
    missing_words: ClassVar[tuple[str, ...]] = ()
    #: what a broken install raises on import.
    import_error: ClassVar[BaseException] = ImportError("libvendor.so: cannot open shared object file")
    #: what the runtime raises from ``device_count()`` (a second line is added; the reason quotes the first).
    runtime_error: ClassVar[BaseException] = RuntimeError("the runtime found no driver")
    #: what the driver warns while ``device_count()`` answers 0.
    driver_warning: ClassVar[str] = "driver not loaded"

    # --- helpers (not tests) ----------------------------------------------------------

    def vendor_class(self) -> Any:
        impl = self.load_spec().impl
        for name in ("package", "vendor", "missing", "import_hint"):
            assert isinstance(getattr(impl, name, None), str) and getattr(impl, name), (
                f"{impl.__name__}.{name} must be set (a VendorDevice names its vendor specifics)"
            )
        return impl

    def fake_extension(self, monkeypatch: pytest.MonkeyPatch, count: Any = 0, warning: str = "",
                       registers: bool = True) -> Any:
        """Make ``import <package>`` succeed and ``torch.<type>.device_count()`` answer ``count`` (an
        exception instance is raised instead), for this test only; returns the device class."""
        cls = self.vendor_class()

        def device_count() -> int:
            if warning:
                warnings.warn(warning, UserWarning, stacklevel=1)
            if isinstance(count, BaseException):
                raise count
            return int(count)

        monkeypatch.setattr(vendor, "find_spec", lambda name: object())
        monkeypatch.setitem(sys.modules, cls.package, ModuleType(cls.package))
        if registers:
            monkeypatch.setattr(torch, cls.torch_device_type, SimpleNamespace(device_count=device_count), raising=False)
        else:
            monkeypatch.delattr(torch, cls.torch_device_type, raising=False)
        return cls

    # --- without hardware -------------------------------------------------------------

    def test_import_and_load_do_not_import_the_extension(self, tmp_path: Path) -> None:
        """A sentinel extension on the path fails loudly if anything imports it before probe()."""
        package = self.vendor_class().package
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(
            f"raise RuntimeError('sentinel {package}: imported, which the test forbids until probe()')\n"
        )
        code = (
            "import json, sys\n"
            "from dsr1.registry import PluginRegistry\n"
            f"spec = PluginRegistry().load('device', {self.plugin!r})\n"
            "device = spec.make({'memory_fraction': 0.5})\n"
            f"before = {{'extension': {package!r} in sys.modules, 'torch': 'torch' in sys.modules}}\n"
            "result = device.probe()\n"
            "print(json.dumps({'before': before, 'available': result.available, 'reason': result.reason}))\n"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
               "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}  # test the plugin, not torch's backend autoload
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["before"] == {"extension": False, "torch": False}
        # probe() did import it, and turned the failure into a reason instead of raising
        assert report["available"] is False
        assert report["reason"].startswith(f"{package} failed to import: RuntimeError: sentinel {package}")

    def test_probe_names_the_missing_package(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.vendor_class()
        monkeypatch.setattr(vendor, "find_spec", lambda name: None)
        result = self.make_impl().probe()
        assert (result.available, result.reason, result.device_count) == (False, cls.missing, 0)
        assert f"{cls.package} is not installed" in result.reason
        assert all(word in result.reason for word in self.missing_words), (result.reason, self.missing_words)

    def test_probe_here_says_not_installed(self) -> None:
        cls = self.vendor_class()
        if vendor.find_spec(cls.package) is not None:
            pytest.skip(f"{cls.package} is installed here")
        assert self.make_impl().probe() == ProbeResult(available=False, reason=cls.missing)

    def test_probe_when_import_fails(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls, error = self.vendor_class(), self.import_error

        def broken(name: str) -> ModuleType:
            raise error

        monkeypatch.setattr(vendor, "find_spec", lambda name: object())
        monkeypatch.setattr(vendor, "import_module", broken)
        result = self.make_impl().probe()
        assert not result.available
        assert result.reason == f"{cls.package} failed to import: {type(error).__name__}: {error} ({cls.import_hint})"

    def test_probe_when_the_extension_registers_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.fake_extension(monkeypatch, registers=False)
        result = self.make_impl().probe()
        assert not result.available and f"registered no torch.{cls.torch_device_type}" in result.reason

    def test_probe_with_no_device_names_visible_devices(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.fake_extension(monkeypatch, count=0)
        env, label = cls.visible_devices_env, cls.torch_device_type.upper()
        monkeypatch.setenv(env, "")
        assert self.make_impl().probe().reason == f"no {label} device visible ({env}='')"
        monkeypatch.delenv(env)
        assert self.make_impl().probe().reason == f"no {label} device visible ({env}=unset)"

    def test_probe_quotes_the_runtime(self, monkeypatch: pytest.MonkeyPatch) -> None:
        error = type(self.runtime_error)(f"{self.runtime_error}\nsecond line")
        cls = self.fake_extension(monkeypatch, count=error)
        result = self.make_impl().probe()
        assert not result.available
        assert result.reason == f"the {cls.vendor} runtime refused: {type(error).__name__}: {self.runtime_error}"

    def test_probe_quotes_the_driver_warning(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.fake_extension(monkeypatch, count=0, warning=self.driver_warning)
        assert self.make_impl().probe().reason == f"the {cls.vendor} driver refused: {self.driver_warning}"

    def test_probe_checks_device_index(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.fake_extension(monkeypatch, count=2)
        ok = self.make_impl().probe()
        assert (ok.available, ok.device_count) == (True, 2)
        out = self.make_impl(device_index=2).probe()
        label = cls.torch_device_type.upper()
        assert not out.available and out.reason.startswith(f"device_index 2 is out of range: 2 {label} device(s) visible")

    @pytest.mark.parametrize("call", sorted(HARDWARE_CALLS))
    def test_hardware_methods_raise_one_line_error(self, call: str, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = self.vendor_class()
        monkeypatch.setattr(vendor, "find_spec", lambda name: None)
        device = self.make_impl(memory_fraction=0.5)
        with pytest.raises(Dsr1Error) as info:
            HARDWARE_CALLS[call](device)
        assert str(info.value) == f"{cls.torch_device_type} device is not available here: {cls.missing}"

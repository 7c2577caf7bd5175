"""The part of the conformance kit every family shares: packaging and the plugin contract.

A plugin's tests subclass a family kit and name the plugin::

    class TestMine(AttentionConformance):
        plugin = "mine"                 # the entry-point name, required
        options = {"backend": "math"}   # optional: options to instantiate it with

Every test loads the plugin through a FRESH :class:`dsr1.registry.PluginRegistry`, so
the kit checks the real installed entry point, never an object imported by hand.

Attributes a test class may set:

``plugin``       entry-point name (required).
``family``       set by each family kit; set it yourself only on :class:`PluginConformance`.
``options``      dict of options for the plugin's options model (default ``{}``).
``device``       torch device type the behaviour checks run on; default ``$DSR1_TEST_DEVICE``
                 or ``"cpu"`` (``pytest --dsr1-device cuda`` sets it too).
``max_examples`` hypothesis examples per property test (default 10).

Capabilities of the form ``"device:<type>"`` declare the devices a plugin runs on (none
declared: all). ``validate(<type>)`` must refuse, with a reason, every device left out.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ValidationError

from dsr1.interfaces import BASE_CLASSES, Plugin
from dsr1.registry import PluginRegistry
from dsr1.specs import SUPPORTED_API_VERSIONS, PluginSpec
from dsr1_sdk.testing.isolation import import_report, runtime_problems

#: Device types the kit asks ``validate`` about when a plugin declares ``device:`` capabilities.
KNOWN_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mlu", "npu", "xpu", "mps")


def declared_devices(capabilities: frozenset[str]) -> frozenset[str] | None:
    """Devices named by ``device:<type>`` capabilities, or ``None`` when none are (runs anywhere)."""
    found = frozenset(c.split(":", 1)[1] for c in capabilities if c.startswith("device:"))
    return found or None


def check_packaging(registry: PluginRegistry, family: str, name: str) -> PluginSpec:
    """Entry point installed, loads, names agree, API version supported, impl subclasses the base."""
    infos = [i for i in registry.discover(family) if i.name == name]
    assert infos, (
        f"no entry point {name!r} in group 'dsr1.{family}' in the installed metadata "
        f"(installed: {registry.names(family)}); declare it in pyproject.toml under "
        f'[project.entry-points."dsr1.{family}"] and reinstall'
    )
    assert all(i.distribution != "?" for i in infos), f"entry point {name!r} belongs to no distribution"
    spec = registry.load(family, name)
    assert isinstance(spec, PluginSpec), f"load returned {type(spec).__name__}, not a PluginSpec"
    assert spec.name == name, f"spec name {spec.name!r} != entry-point name {name!r}"
    assert spec.family == family, f"spec family {spec.family!r} != {family!r}"
    assert isinstance(spec.api_version, int) and spec.api_version in SUPPORTED_API_VERSIONS, (
        f"API version {spec.api_version!r} not in supported {sorted(SUPPORTED_API_VERSIONS)}"
    )
    base = BASE_CLASSES[family]
    assert isinstance(spec.impl, type) and issubclass(spec.impl, base), (
        f"impl {spec.impl!r} does not subclass dsr1.interfaces.{base.__name__}"
    )
    assert not inspect.isabstract(spec.impl), (
        f"impl {spec.impl.__name__} leaves abstract methods unimplemented: "
        f"{sorted(getattr(spec.impl, '__abstractmethods__', ()))}"
    )
    return spec


def check_options_model(options: type[BaseModel]) -> None:
    """The options model forbids unknown keys and its defaults round-trip through JSON."""
    assert isinstance(options, type) and issubclass(options, BaseModel), f"options {options!r} is not a pydantic model"
    assert options.model_config.get("extra") == "forbid", (
        f"{options.__name__} must forbid unknown keys: model_config = ConfigDict(extra='forbid') "
        "(or subclass dsr1_sdk.PluginOptions)"
    )
    with pytest.raises(ValidationError):
        options.model_validate({"definitely_not_an_option_key": 1})
    default = options()
    again = options.model_validate_json(default.model_dump_json())
    assert again == default, f"{options.__name__} does not round-trip through JSON"


def check_declared_devices(impl: Plugin, capabilities: frozenset[str]) -> None:
    """``validate`` refuses, with a reason, every known device not declared by ``device:`` capabilities."""
    devices = declared_devices(capabilities)
    for device in KNOWN_DEVICE_TYPES:
        reasons = impl.validate(device)
        assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons), (
            f"validate({device!r}) returned {reasons!r}, expected list[str]"
        )
        if devices is not None and device not in devices:
            assert reasons and all(r.strip() for r in reasons), (
                f"the plugin declares it runs on {sorted(devices)} only, but validate({device!r}) "
                "gives no reason to refuse it"
            )


class PluginConformance:
    """Packaging and contract checks shared by every family kit (usable alone for any family)."""

    plugin: ClassVar[str] = ""
    family: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    device: ClassVar[str | None] = None
    max_examples: ClassVar[int] = 10

    # --- helpers (not tests) ----------------------------------------------------------

    @classmethod
    def target_device(cls) -> str:
        """The torch device type behaviour checks run on."""
        return cls.device or os.environ.get("DSR1_TEST_DEVICE") or "cpu"

    def fresh_registry(self) -> PluginRegistry:
        """A new registry: no state shared between tests."""
        if not self.plugin or not self.family:
            raise pytest.UsageError(f"{type(self).__name__} must set `plugin` (and `family` on PluginConformance)")
        return PluginRegistry()

    def load_spec(self) -> PluginSpec:
        """The plugin's spec, loaded through a fresh registry once per test (pytest makes a new
        instance of the class for every test; scanning the entry points per call is slow)."""
        spec: PluginSpec | None = self.__dict__.get("_spec")
        if spec is None:
            spec = self.__dict__["_spec"] = self.fresh_registry().load(self.family, self.plugin)
        return spec

    def make_impl(self, **overrides: Any) -> Any:
        """An instance built from ``options`` (plus ``overrides``) the way the engine builds it."""
        spec = self.load_spec()
        return spec.make(spec.options.model_validate({**self.options, **overrides}))

    def capabilities(self) -> frozenset[str]:
        return self.load_spec().capabilities

    def skip_unless_runs_here(self, impl: Plugin, dtype: Any = None) -> None:
        """Skip (with the plugin's own reasons) when ``validate`` refuses the kit's device/dtype."""
        reasons = impl.validate(self.target_device(), dtype)
        if reasons:
            pytest.skip(f"{self.plugin} refuses {self.target_device()}/{dtype}: " + "; ".join(reasons))

    # --- packaging --------------------------------------------------------------------

    def test_entry_point_loads_through_fresh_registry(self) -> None:
        check_packaging(self.fresh_registry(), self.family, self.plugin)

    def test_two_registries_are_independent(self) -> None:
        first, second = self.fresh_registry(), self.fresh_registry()
        spec = first.load(self.family, self.plugin)
        assert second.load(self.family, self.plugin).impl is spec.impl
        assert first.pm is not second.pm

    def test_options_model_forbids_unknown_keys(self) -> None:
        check_options_model(self.load_spec().options)

    def test_kit_options_validate(self) -> None:
        spec = self.load_spec()
        options = spec.options.model_validate(self.options)
        assert json.loads(options.model_dump_json()) == json.loads(
            spec.options.model_validate_json(options.model_dump_json()).model_dump_json()
        )

    def test_instantiates_like_the_engine(self) -> None:
        spec = self.load_spec()
        impl = self.make_impl()
        assert isinstance(impl, spec.impl)
        assert isinstance(impl.options, spec.options), "Plugin.__init__ must keep the validated options"

    def test_spec_metadata(self) -> None:
        spec = self.load_spec()
        assert isinstance(spec.capabilities, frozenset) and all(isinstance(c, str) for c in spec.capabilities)
        assert spec.description.strip(), "give the spec a one-line description (shown by `dsr1 plugins list`)"
        assert "\n" not in spec.description.strip(), "the description must be one line"

    def test_validate_gives_reasons_for_undeclared_devices(self) -> None:
        check_declared_devices(self.make_impl(), self.capabilities())

    def test_import_starts_no_device_runtime(self) -> None:
        report = import_report(self.family, self.plugin, self.options)
        problems = runtime_problems(report["after_import"], report.get("device_type"), "importing the plugin")
        assert not problems, "; ".join(problems) + " - defer device work to probe()/first use"

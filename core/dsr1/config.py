"""Engine configuration: one field per plugin family, plus the seed's hardware section.

Every model forbids unknown keys. Errors become one line that names the full key path
and the closest valid key. Configs load from Python (dicts / keywords), YAML, TOML and
``DSR1_<FAMILY>`` environment variables, and round-trip through JSON.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsr1.errors import Dsr1Error, did_you_mean
from dsr1.hookspecs import FAMILIES


class PluginChoice(BaseModel):
    """A plugin picked by name, with options its own options model validates."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kernel_fusion: bool = False
    tiling_strategy: Literal["auto", "fixed"] = "fixed"
    #: a device without a compile backend runs unfused (with a warning) instead of refusing.
    fallback: bool = False


#: The seed's hardware ``type`` → device plugin name.
HARDWARE_TYPES: dict[str, str] = {
    "cambricon": "mlu",
    "mlu": "mlu",
    "nvidia": "cuda",
    "cuda": "cuda",
    "ascend": "npu",
    "huawei": "npu",
    "npu": "npu",
    "cpu": "cpu",
    "auto": "auto",  # probe the installed device plugins in order (dsr1.device_select)
}


class HardwareConfig(BaseModel):
    """The seed's hardware section, accepted verbatim."""

    model_config = ConfigDict(extra="forbid")

    type: str = "cpu"
    precision: str | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value.lower() not in HARDWARE_TYPES:
            raise ValueError(f"unknown hardware type {value!r}{did_you_mean(value.lower(), HARDWARE_TYPES)}")
        return value.lower()

    @property
    def device(self) -> str:
        return HARDWARE_TYPES[self.type]


def fusion_choice(device: str, tiling_strategy: str, fallback: bool = False) -> PluginChoice:
    """The graph pass ``kernel_fusion: true`` means on ``device``: on cuda, the decode step
    compiled by torch.compile and captured as a CUDA graph; elsewhere, torch.compile with the
    device's backend."""
    options: dict[str, Any] = {"tiling_strategy": tiling_strategy}
    if fallback:
        options["fallback"] = True
    if device == "cuda":
        return PluginChoice(name="cudagraph", options={**options, "compile": True})
    return PluginChoice(name="compile", options=options)


#: What each family falls back to when the config leaves it unset. ``None``: off.
DEFAULTS: dict[str, str | None] = {
    "preprocess": "tokenizers",
    "model": None,  # picked by the checkpoint's model_type
    "attention": "sdpa",
    "device": "cpu",
    "quant": None,  # keep the checkpoint's dtype
    "pruning": None,
    "graph": "eager",
    "pool": "single",
    "scheduler": "static",
    "kvcache": "contiguous",
    "decoding": "sampling",
    "monitor": "timing",
}


class EngineConfig(BaseModel):
    """Which plugin runs each stage. Each field takes a name or ``{"name", "options"}``."""

    model_config = ConfigDict(extra="forbid")

    preprocess: PluginChoice | None = None
    model: PluginChoice | None = None
    attention: PluginChoice | None = None
    device: PluginChoice | None = None
    quant: PluginChoice | None = None
    pruning: PluginChoice | None = None
    graph: PluginChoice | None = None
    pool: PluginChoice | None = None
    scheduler: PluginChoice | None = None
    kvcache: PluginChoice | None = None
    decoding: PluginChoice | None = None
    monitor: PluginChoice | None = None
    hardware: HardwareConfig | None = None

    def choice(self, family: str) -> PluginChoice | None:
        """The effective choice of ``family``: explicit, else from hardware, else the default."""
        chosen: PluginChoice | None = getattr(self, family)
        if chosen is not None:
            return chosen
        hw = self.hardware
        if hw is not None:
            if family == "device":
                return PluginChoice(name=hw.device)
            if family == "quant" and hw.precision:
                return PluginChoice(name=hw.precision)
            if family == "graph" and hw.optimizer.kernel_fusion:
                return fusion_choice(hw.device, hw.optimizer.tiling_strategy, hw.optimizer.fallback)
        default = DEFAULTS[family]
        return PluginChoice(name=default) if default else None

    @model_validator(mode="after")
    def _hardware_agrees(self) -> EngineConfig:
        hw = self.hardware
        if hw is not None and self.device is not None and self.device.name != hw.device:
            raise ValueError(
                f"device {self.device.name!r} contradicts hardware.type {hw.type!r} "
                f"(which means device {hw.device!r}); set one of them"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


# --- loading ------------------------------------------------------------------------------


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at ``loc`` (for 'did you mean' on unknown keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", (annotation,))
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first error of ``err`` as one line with its key path and a hint."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-before[_from_name(), PluginChoice]",))
    path = prefix + ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _valid_keys(model, loc)) if loc else ""
        return f"unknown config key {path!r}{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) or value is None else ""
    return f"invalid config value at {path or '<root>'!r}: {msg}{shown}"


def parse_config(data: Mapping[str, Any], source: str = "config") -> EngineConfig:
    """Validate a mapping into an :class:`EngineConfig` with one-line errors."""
    if not isinstance(data, Mapping):
        raise Dsr1Error(f"{source}: expected a mapping of family names to plugins, got {type(data).__name__}")
    try:
        return EngineConfig.model_validate(dict(data))
    except ValidationError as err:
        raise Dsr1Error(f"{source}: {format_validation_error(err, EngineConfig)}") from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a dict (syntax errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise Dsr1Error(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise Dsr1Error(f"config file {str(path)!r} is empty; write at least one family, e.g. 'attention: sdpa'")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise Dsr1Error(f"TOML syntax error in {str(path)!r}: {err}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise Dsr1Error(f"JSON syntax error in {str(path)!r} at line {err.lineno}: {err.msg}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise Dsr1Error(f"YAML syntax error in {str(path)!r}{line}: {problem}") from None
    else:
        raise Dsr1Error(f"config file {str(path)!r}: unknown format {suffix!r}; use .yaml, .yml, .toml or .json")
    if data is None:
        raise Dsr1Error(f"config file {str(path)!r} is empty; write at least one family, e.g. 'attention: sdpa'")
    if not isinstance(data, dict):
        raise Dsr1Error(f"config file {str(path)!r}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_option_items(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items → plugin options; values parse as JSON when they can
    (``["group_size=64", "skip=[\\"lm_head\\"]"]`` → ``{"group_size": 64, "skip": ["lm_head"]}``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Dsr1Error(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``DSR1_<FAMILY>=name`` environment variables as config entries."""
    environ = os.environ if environ is None else environ
    return {f: environ[f"DSR1_{f.upper()}"] for f in FAMILIES if environ.get(f"DSR1_{f.upper()}")}


def load_config(
    config: EngineConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> EngineConfig:
    """Merge, in increasing precedence: ``config`` (object, dict or file), ``DSR1_*``
    environment variables, then keyword ``overrides`` (``attention="sdpa"``)."""
    source = "config"
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, EngineConfig):
        data = config.model_dump(exclude_none=True)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        source = str(config)
        data = read_config_file(config)
    data.update(env_overrides(environ))
    unknown = [k for k in overrides if k not in EngineConfig.model_fields]
    if unknown:
        raise Dsr1Error(f"unknown config key {unknown[0]!r}{did_you_mean(unknown[0], EngineConfig.model_fields)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, source)

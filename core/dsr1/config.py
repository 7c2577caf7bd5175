"""Engine configuration: one field per plugin family, plus the seed's hardware section.

Every model forbids unknown keys. Errors become one line that names the full key path
and the closest valid key. Configs load from Python (dicts / keywords), YAML, TOML and
``DSR1_<FAMILY>`` environment variables, and round-trip through JSON.

The hardware section and the family keys may say the same thing twice; when they say
different things the config is refused, naming both keys (see
:meth:`EngineConfig._hardware_agrees`). Config files are read defensively: only regular
UTF-8 text files of at most :data:`MAX_CONFIG_BYTES`, nested at most
:data:`MAX_CONFIG_DEPTH` deep, with at most :data:`MAX_CONFIG_VALUES` values.
"""
from __future__ import annotations

import functools
import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsr1.errors import Dsr1Error, did_you_mean, quote
from dsr1.specs import FAMILIES

#: largest config file read. An engine config is a few hundred bytes; a file this large is
#: something else (a checkpoint passed by mistake) and would only make a huge error line.
MAX_CONFIG_BYTES = 1 << 20
#: deepest nesting of mappings and lists. The schema needs 4 levels (``hardware.optimizer.x``,
#: ``family.options.key.value``); the limit keeps the parsers and pydantic far from Python's
#: recursion limit.
MAX_CONFIG_DEPTH = 32
#: most values (scalars, lists, mappings) a config may hold once YAML aliases are expanded, so
#: an alias bomb (``a: &a [*b, *b, ...]``) is refused instead of expanded into gigabytes.
MAX_CONFIG_VALUES = 100_000


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
            raise ValueError(f"unknown hardware type {quote(value)}{did_you_mean(value.lower(), HARDWARE_TYPES)}")
        return value.lower()

    @property
    def device(self) -> str:
        return HARDWARE_TYPES[self.type]


class ParallelConfig(BaseModel):
    """How one model spreads over the processes of a ``torchrun`` launch (docs/parallel.md).

    ``tensor`` and ``pipeline`` 1 is the single-device path, untouched. Otherwise ``tensor *
    pipeline`` must equal the world size (rank = stage * tensor + tensor rank); the model's head,
    MLP and layer counts are checked against them when the model is built (they come from its
    config.json)."""

    model_config = ConfigDict(extra="forbid")

    #: tensor-parallel ranks: each holds 1/tensor of the attention heads, MLP and vocabulary.
    tensor: int = Field(default=1, ge=1)
    #: pipeline stages: each holds a contiguous range of the layers (at most one stage per layer).
    pipeline: int = Field(default=1, ge=1)
    #: rows of a forward split into this many micro-batches, so that stages overlap; default: ``pipeline``
    #: (capped at the rows of each forward).
    micro_batches: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _micro_batches_need_stages(self) -> ParallelConfig:
        if self.micro_batches is not None and self.pipeline == 1:
            raise ValueError(f"parallel.micro_batches {self.micro_batches} splits a forward's rows between pipeline "
                             f"stages, but parallel.pipeline is 1; set pipeline above 1 or leave micro_batches out")
        return self
    #: seconds a collective (and the rendezvous) waits for the other ranks before failing.
    timeout_s: float = Field(default=300.0, gt=0)


def fusion_choice(device: str, tiling_strategy: str, fallback: bool = False) -> PluginChoice:
    """The graph pass ``kernel_fusion: true`` means on ``device``. With ``tiling_strategy: auto``,
    ``adaptive`` on every device: it measures the plans the device offers (eager, compiled, and on
    cuda captured and compiled + captured) per batch and context bucket and keeps the fastest.
    With ``fixed``: on cuda, the decode step compiled by torch.compile and captured as a CUDA
    graph; elsewhere, torch.compile with the device's backend."""
    options: dict[str, Any] = {"tiling_strategy": tiling_strategy}
    if fallback:
        options["fallback"] = True
    if tiling_strategy == "auto":
        return PluginChoice(name="adaptive", options=options)
    if device == "cuda":
        return PluginChoice(name="cudagraph", options={**options, "compile": True})
    return PluginChoice(name="compile", options=options)


def fuses_kernels(choice: PluginChoice) -> bool:
    """Whether the graph pass ``choice`` fuses kernels (what ``kernel_fusion: true`` asks for):
    ``adaptive`` counts, as compiled plans are among those it measures. Graph passes of other
    plugins count as not fusing."""
    return choice.name in ("compile", "adaptive") or (choice.name == "cudagraph" and choice.options.get("compile")
                                                     is True)


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
    parallel: ParallelConfig | None = None
    #: devices besides ``device`` that the pool may run modules on: ``device: [cuda, cpu]`` is
    #: ``device: cuda`` with ``extra_devices: [cpu]`` (the compute device first).
    extra_devices: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _device_list(cls, data: Any) -> Any:
        """``device: [cuda, cpu]``: the first entry computes, the rest go to ``extra_devices``."""
        if not isinstance(data, dict) or not isinstance(data.get("device"), list):
            return data
        names = data["device"]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("device: a list names devices, the compute device first, e.g. device: [cuda, cpu]")
        if "auto" in names or len(set(names)) != len(names):
            raise ValueError(f"device: {names} must name distinct devices, the compute device first, without auto, "
                             f"e.g. device: [cuda, cpu]")
        if data.get("extra_devices") is not None:
            raise ValueError("device: write the extra devices once, in device: [cuda, cpu] or in extra_devices")
        return {**data, "device": names[0], "extra_devices": names[1:] or None}

    @model_validator(mode="after")
    def _extra_devices_differ(self) -> EngineConfig:
        extra = self.extra_devices or []
        compute = self.device.name if self.device is not None else None
        if len(set(extra)) != len(extra) or compute in extra or "auto" in extra:
            raise ValueError(f"extra_devices {extra} must name devices other than the compute device "
                             f"{compute or 'cpu'!r}, once each, without auto, e.g. device: [cuda, cpu]")
        return self

    def choice(self, family: str) -> PluginChoice | None:
        """The effective choice of ``family``: explicit, else from hardware, else the default.

        An explicit graph pass that fuses kernels takes the ``tiling_strategy`` and ``fallback``
        written in ``hardware.optimizer`` as options it does not set itself (the validator has
        already refused the two when they disagree)."""
        chosen: PluginChoice | None = getattr(self, family)
        if chosen is not None:
            if family == "graph" and self.hardware is not None and fuses_kernels(chosen):
                written = self.hardware.optimizer.model_fields_set & {"tiling_strategy", "fallback"}
                tuning = {k: getattr(self.hardware.optimizer, k) for k in sorted(written)}
                return chosen.model_copy(update={"options": {**tuning, **chosen.options}})
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
        """A family key and the hardware key that sets the same thing must agree; otherwise the
        config is refused, naming both (nothing wins silently, so there is no precedence to
        remember and ``dsr1 config check`` never shows a setting that is ignored):

        * ``device`` and ``hardware.type`` (through :data:`HARDWARE_TYPES`);
        * ``quant`` and ``hardware.precision`` (a precision names the quant plugin: ``bf16``,
          ``int8`` ...), so ``precision: bf16`` with ``quant: int8`` is refused;
        * ``graph`` and ``hardware.optimizer.kernel_fusion`` when kernel_fusion is written: true
          needs a pass that fuses kernels (``compile``, or ``cudagraph`` with ``compile: true``),
          false one that does not;
        * the graph options ``tiling_strategy`` / ``fallback`` and the same keys of
          ``hardware.optimizer``, when both are written;
        * ``hardware.optimizer.tiling_strategy: auto`` or ``fallback: true`` and a graph that does
          not fuse kernels (they tune fusion: without it they would be ignored).
        """
        hw = self.hardware
        if hw is None:
            return self
        fix = "remove one of them or make them agree"
        if self.device is not None and self.device.name != hw.device:
            raise ValueError(
                f"device {self.device.name!r} contradicts hardware.type {hw.type!r} "
                f"(which means device {hw.device!r}); {fix}"
            )
        if self.quant is not None and hw.precision is not None and self.quant.name != hw.precision:
            raise ValueError(
                f"quant {self.quant.name!r} contradicts hardware.precision {hw.precision!r} "
                f"(which means quant {hw.precision!r}); {fix}"
            )
        opt, graph = hw.optimizer, self.graph
        # tiling and fallback tune kernel fusion: asked for without fusion they would do nothing
        fusing = fuses_kernels(graph) if graph is not None else opt.kernel_fusion
        tuning = [f"tiling_strategy {quote(opt.tiling_strategy)}"] if opt.tiling_strategy != "fixed" else []
        tuning += ["fallback true"] if opt.fallback else []
        if tuning and not fusing:
            by = (f"graph {graph.name!r} does not fuse kernels" if graph is not None
                  else "kernel fusion is off (hardware.optimizer.kernel_fusion: true turns it on)")
            raise ValueError(f"hardware.optimizer.{tuning[0]} tunes kernel fusion, but {by}; {fix}")
        if graph is None:
            return self
        if "kernel_fusion" in opt.model_fields_set and fuses_kernels(graph) != opt.kernel_fusion:
            does = "fuses kernels" if fuses_kernels(graph) else "does not fuse kernels"
            wanted = ("graph 'compile' (or 'cudagraph' with compile: true)" if opt.kernel_fusion
                      else "graph 'eager' (or 'cudagraph' without compile)")
            raise ValueError(
                f"graph {graph.name!r} {does}, which contradicts hardware.optimizer.kernel_fusion "
                f"{str(opt.kernel_fusion).lower()} (which means {wanted}); {fix}"
            )
        for key in ("tiling_strategy", "fallback"):
            if key in opt.model_fields_set and key in graph.options and graph.options[key] != getattr(opt, key):
                raise ValueError(
                    f"graph option {key} {quote(graph.options[key])} contradicts hardware.optimizer.{key} "
                    f"{getattr(opt, key)!r}; {fix}"
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
    first = err.errors(include_url=False, include_context=False)[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-before[_from_name(), PluginChoice]",))
    # a key may be user input of any length: each part of the path is cut, and so is the value
    path = prefix + ".".join(str(p) if len(str(p)) <= 80 else f"{str(p)[:80]}...({len(str(p))} chars)" for p in loc)
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _valid_keys(model, loc)) if loc else ""
        return f"unknown config key {path!r}{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {quote(value)})" if isinstance(value, (str, int, float, bool)) or value is None else ""
    return f"invalid config value at {path or '<root>'!r}: {msg}{shown}"


def parse_config(data: Mapping[str, Any], source: str = "config") -> EngineConfig:
    """Validate a mapping into an :class:`EngineConfig` with one-line errors."""
    if not isinstance(data, Mapping):
        raise Dsr1Error(f"{source}: expected a mapping of family names to plugins, got {type(data).__name__}")
    check_shape(data, source)
    try:
        return EngineConfig.model_validate(dict(data))
    except ValidationError as err:
        raise Dsr1Error(f"{source}: {format_validation_error(err, EngineConfig)}") from None


def check_shape(data: Any, source: str = "config") -> None:
    """Refuse data nested deeper than :data:`MAX_CONFIG_DEPTH`, holding more than
    :data:`MAX_CONFIG_VALUES` values or an integer of more than 64 bits, walking without
    recursion (shared YAML aliases count once per use, as they would once expanded)."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    seen = 0
    while stack:
        value, depth, path = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise Dsr1Error(f"{source}: holds more than {MAX_CONFIG_VALUES} values (YAML aliases counted expanded); "
                            f"an engine config names a plugin per family with a few options")
        if isinstance(value, int) and value.bit_length() > 64:  # YAML reads 0x... of any length
            raise Dsr1Error(f"{source}: {quote(path or '<root>')} is an integer of {value.bit_length()} bits; numbers "
                            f"in a config fit in 64 bits")
        if isinstance(value, Mapping):
            children: list[tuple[Any, str]] = [(k, path) for k in value]
            children += [(v, _child_path(path, k)) for k, v in value.items()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = [(v, _child_path(path, i)) for i, v in enumerate(value)]
        else:
            continue
        if depth >= MAX_CONFIG_DEPTH and children:
            raise Dsr1Error(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep; an engine config needs "
                            f"about 4 (family.options.key.value)")
        stack.extend((child, depth + 1, where) for child, where in children)


def _child_path(path: str, key: Any) -> str:
    """``path.key`` (or ``path[i]``) for a message, each part and the whole kept short."""
    if len(path) > 200:
        return path  # already cut; keys may be megabytes long
    if isinstance(key, int) and not isinstance(key, bool):
        part = f"[{key}]" if key.bit_length() <= 64 else "[<integer>]"
    else:
        text = key if isinstance(key, str) else type(key).__name__
        part = ("." if path else "") + (text if len(text) <= 40 else f"{text[:40]}...")
    return path + part


def _show(path: Path) -> str:
    """A path for a message: quoted, and cut only when absurdly long."""
    return quote(str(path), 500)


def _not_a_config(path: Path) -> Dsr1Error | None:
    """Why ``path`` cannot be read as a config file (missing, not a regular file, too large,
    unreadable), or ``None``. ``stat`` follows links, so a symlink loop says so here."""
    shown = _show(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Dsr1Error(f"config file {shown} does not exist")
    except OSError as err:
        return Dsr1Error(f"cannot read config file {shown}: {err.strerror or type(err).__name__}")
    if stat.S_ISDIR(st.st_mode):
        return Dsr1Error(f"config file {shown} is a directory; pass a YAML, TOML or JSON file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        return Dsr1Error(f"config file {shown} is not a regular file; pass a YAML, TOML or JSON file")
    if st.st_size > MAX_CONFIG_BYTES:
        return Dsr1Error(f"config file {shown} is {st.st_size} bytes, more than the {MAX_CONFIG_BYTES} a config "
                         f"may have; is it the right file?")
    return None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); binary or non-UTF-8 files are refused."""
    problem = _not_a_config(path)
    if problem is not None:
        raise problem
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise Dsr1Error(f"cannot read config file {_show(path)}: {err.strerror or type(err).__name__}") from None
    if len(raw) > MAX_CONFIG_BYTES:  # it grew since stat
        raise Dsr1Error(f"config file {_show(path)} is more than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise Dsr1Error(f"config file {_show(path)} is not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise Dsr1Error(f"config file {_show(path)} is binary (it holds NUL bytes), not YAML, TOML or JSON text")
    return text


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a dict (syntax errors name the line)."""
    path = Path(path)
    shown = _show(path)
    text = _read_text(path)
    if not text.strip():
        raise Dsr1Error(f"config file {shown} is empty; write at least one family, e.g. 'attention: sdpa'")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise Dsr1Error(f"config file {shown}: unknown format {quote(suffix)}; use .yaml, .yml, .toml or .json")
    try:
        data = _parse(text, suffix, shown)
    except RecursionError:  # the parsers recurse per level; the stack is unwound by now
        raise Dsr1Error(f"config file {shown} is nested too deeply to parse; an engine config needs about 4 levels "
                        f"(family.options.key.value)") from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits, a bad date ...
        problem = str(err).split(": value has")[0]  # drop Python's advice to raise the process-wide limit
        raise Dsr1Error(f"config file {shown} holds a value that cannot be read ({problem})") from None
    if data is None:
        raise Dsr1Error(f"config file {shown} is empty; write at least one family, e.g. 'attention: sdpa'")
    if not isinstance(data, dict):
        raise Dsr1Error(f"config file {shown}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse(text: str, suffix: str, shown: str) -> Any:
    """``text`` parsed by its format; syntax errors become one line that names the line."""
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # the same parser, from PyPI (a dependency on 3.10 only)
            import tomli as tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise Dsr1Error(f"TOML syntax error in {shown}: {err}") from None
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, shown))
        except json.JSONDecodeError as err:
            raise Dsr1Error(f"JSON syntax error in {shown} at line {err.lineno}: {err.msg}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise Dsr1Error(f"config file {shown} has the key {quote(dup.key)} twice (lines {dup.first} and {dup.again}); "
                        f"keep one (the last would win silently)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise Dsr1Error(f"YAML syntax error in {shown}{line}: {problem}") from None


def _unique_keys(pairs: list[tuple[str, Any]], shown: str) -> dict[str, Any]:
    """A JSON object, refusing a key given twice in it (``json`` keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Dsr1Error(f"config file {shown} has the key {quote(key)} twice in one object; keep one (the last "
                            f"would win silently)")
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


@functools.cache
def _unique_key_loader() -> Any:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently).
    Keys merged in with ``<<`` may be overridden, as YAML intends."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                except TypeError:  # an unhashable key: SafeLoader says so below
                    continue
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def parse_option_items(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items → plugin options; values parse as JSON when they can
    (``["group_size=64", "skip=[\\"lm_head\\"]"]`` → ``{"group_size": 64, "skip": ["lm_head"]}``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Dsr1Error(f"--option takes KEY=VALUE, got {item!r}")
        if key.strip() in out:  # the last would win silently
            raise Dsr1Error(f"--option {quote(key.strip())} is given twice; give it once")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
        except (RecursionError, ValueError):  # nested past the stack, or a number of thousands of digits
            raise Dsr1Error(f"--option {quote(key.strip())}: the value is nested too deeply or holds a number too "
                            f"long to read") from None
    check_shape(out, "--option")
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
    if isinstance(overrides.get("device"), list):
        data.pop("extra_devices", None)  # a device list written here replaces the config's whole list
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, source)

"""Plugin discovery (metadata only), loading by name (stevedore) and registration (pluggy).

A :class:`PluginRegistry` is an object owned by whoever builds a pipeline; there is no
module-level registry, so every test can make a fresh one.

* :meth:`PluginRegistry.discover` reads entry points with importlib-metadata and imports
  nothing.
* :meth:`PluginRegistry.load` imports exactly one named plugin through a stevedore
  ``NamedExtensionManager``, registers its module with pluggy, runs ``check_pending()``
  and returns its typed :class:`~dsr1.specs.PluginSpec`.
* The allow-list (``DSR1_PLUGINS``, see :func:`parse_allowlist`) is a boundary: it is checked
  against each entry point's distribution and name from metadata, before anything is
  imported, by ``load`` and by ``dsr1 plugins list``.
* :meth:`PluginRegistry.resolve` turns an :class:`~dsr1.config.EngineConfig` into a
  :class:`~dsr1.pipeline.Pipeline` of plain objects: pluggy is not involved after that.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import importlib_metadata
import pluggy
from pydantic import ValidationError

from dsr1 import device_select, hookspecs
from dsr1.config import EngineConfig, PluginChoice, format_validation_error, fusion_choice
from dsr1.distributions import CORE_DISTRIBUTION as CORE_DISTRIBUTION  # these three are imported from here too
from dsr1.distributions import PUBLISHED as PUBLISHED
from dsr1.distributions import pip_hint as pip_hint
from dsr1.errors import Dsr1Error, did_you_mean
from dsr1.pipeline import Pipeline
from dsr1.specs import FAMILIES, SUPPORTED_API_VERSIONS, PluginSpec
from dsr1.specs import EntryPointInfo as EntryPointInfo  # imported from here by `dsr1 plugins`


def normalize_distribution(name: str) -> str:
    """A distribution name compared as pip does (PEP 503): case, ``-``, ``_`` and ``.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_allowlist(value: str | None) -> list[str] | None:
    """``DSR1_PLUGINS`` → allow-list entries; the one meaning of each value:

    * unset → ``None``: every installed plugin may load;
    * set → the entries, separated by commas and/or whitespace; set but empty (or only
      separators) → no entries: only the core's builtins may load.

    An entry is a plugin name (``sdpa``, any family), ``family:name`` (``attention:sdpa``)
    or a distribution name (``dsr1-attention-sdpa``, compared as pip compares names).
    """
    if value is None:
        return None
    return [entry for entry in re.split(r"[,\s]+", value) if entry]


#: allow-lists already checked against the installed plugins in this process (each is checked, and its
#: unmatched entries warned about, once: the check reads every distribution's metadata).
_CHECKED_ALLOWLISTS: set[frozenset[str]] = set()


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise Dsr1Error(f"unknown plugin family {family!r}{did_you_mean(family, FAMILIES)}")


@functools.cache
def _fresh_named_manager() -> type[Any]:
    from stevedore import NamedExtensionManager

    class FreshNamedManager(NamedExtensionManager):  # type: ignore[misc]
        """stevedore keeps entry points per namespace in a class attribute, process-wide
        (``ExtensionManager.ENTRY_POINT_CACHE``); a dsr1 registry is per context, so it
        hands stevedore the entry points it has just read itself."""

        def __init__(self, entry_points: list[Any], **kwargs: Any) -> None:
            self._fresh_entry_points = entry_points
            super().__init__(**kwargs)

        def list_entry_points(self) -> list[Any]:
            return self._fresh_entry_points

    return FreshNamedManager


class PluginRegistry:
    """Discovers, loads and registers dsr1 plugins.

    :param allowlist: which plugins may be imported (``DSR1_PLUGINS``, see :func:`parse_allowlist`):
        plugin names, ``family:name`` pairs or distribution names; ``None`` allows every
        installed plugin. Builtins of the core are always allowed.
    :param trace: write pluggy's hook-call trace to stderr (``DSR1_DEBUG_PLUGINS``).
    """

    def __init__(self, allowlist: Iterable[str] | None = None, trace: bool = False) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.allowlist = frozenset(allowlist) if allowlist is not None else None
        self._allow_names: set[str] = set()
        self._allow_pairs: set[tuple[str, str]] = set()
        self._allow_dists: set[str] = set()
        for entry in sorted(self.allowlist or ()):
            family, sep, name = entry.partition(":")
            if not sep:  # a plugin name or a distribution name: metadata tells which
                self._allow_names.add(entry)
                self._allow_dists.add(normalize_distribution(entry))
                continue
            if family not in FAMILIES or not name or ":" in name:
                raise Dsr1Error(
                    f"DSR1_PLUGINS entry {entry!r} is not a plugin name, family:name or distribution"
                    f"{did_you_mean(family, FAMILIES) if family not in FAMILIES else ''}"
                )
            self._allow_pairs.add((family, name))
        self._loaded: dict[tuple[str, str], PluginSpec] = {}
        self._origin: dict[tuple[str, str], EntryPointInfo] = {}
        if trace:
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PluginRegistry:
        environ = os.environ if environ is None else environ
        allowlist = parse_allowlist(environ.get("DSR1_PLUGINS"))
        trace = environ.get("DSR1_DEBUG_PLUGINS", "") not in ("", "0", "false")
        registry = cls(allowlist=allowlist, trace=trace)
        registry.warn_unmatched()
        return registry

    def unmatched(self) -> list[str]:
        """The allow-list entries that name no installed plugin, ``family:name`` or distribution."""
        if not self.allowlist:
            return []
        installed = self.discover()
        names = {i.name for i in installed}
        pairs = {(i.family, i.name) for i in installed}
        dists = {normalize_distribution(i.distribution) for i in installed}
        out = []
        for entry in sorted(self.allowlist):
            family, sep, name = entry.partition(":")
            found = (family, name) in pairs if sep else entry in names or normalize_distribution(entry) in dists
            if not found:
                out.append(entry)
        return out

    def warn_unmatched(self) -> None:
        """One warning per process and allow-list for entries that allow nothing installed (a typo allows nothing,
        and the plugin it meant stays out); not an error: an allow-list may name a plugin installed later."""
        if not self.allowlist or self.allowlist in _CHECKED_ALLOWLISTS:
            return
        _CHECKED_ALLOWLISTS.add(self.allowlist)
        for entry in self.unmatched():
            warnings.warn(f"DSR1_PLUGINS entry {entry!r} names no installed plugin or distribution; it allows "
                          f"nothing (installed: dsr1 plugins list)", stacklevel=3)

    # --- discovery (imports nothing) ----------------------------------------------------

    def discover(self, family: str | None = None) -> list[EntryPointInfo]:
        """Every installed plugin of ``family`` (or of all families), from metadata alone."""
        families = FAMILIES if family is None else (family,)
        found: list[EntryPointInfo] = []
        for fam in families:
            _check_family(fam)
            for ep in importlib_metadata.entry_points(group=f"dsr1.{fam}"):
                dist = ep.dist
                found.append(
                    EntryPointInfo(
                        family=fam,
                        name=ep.name,
                        value=ep.value,
                        distribution=dist.name if dist is not None else "?",
                        version=dist.version if dist is not None else "?",
                    )
                )
        return sorted(found, key=lambda i: (FAMILIES.index(i.family), i.name, i.distribution))

    def names(self, family: str) -> list[str]:
        return sorted({i.name for i in self.discover(family)})

    # --- the allow-list (metadata only) ---------------------------------------------------

    def allowed_by(self, info: EntryPointInfo) -> str:
        """Why ``info`` may be imported: ``"all"`` (no allow-list), ``"core"``, ``"distribution"``,
        ``"name"`` (a plugin name or ``family:name`` entry); ``""`` when it may not."""
        if self.allowlist is None:
            return "all"
        dist = normalize_distribution(info.distribution)
        if dist == CORE_DISTRIBUTION:
            return "core"
        if dist in self._allow_dists:
            return "distribution"
        if info.name in self._allow_names or (info.family, info.name) in self._allow_pairs:
            return "name"
        return ""

    def allows(self, info: EntryPointInfo) -> bool:
        return bool(self.allowed_by(info))

    def describe_allowlist(self) -> str:
        """What ``DSR1_PLUGINS`` holds, for messages: ``"sdpa, cpu"``, or what an unset or empty one means."""
        if self.allowlist is None:
            return "unset: every installed plugin may load"
        if not self.allowlist:
            return "set but empty: only the core's builtins may load"
        return ", ".join(sorted(self.allowlist))

    # --- loading one plugin ---------------------------------------------------------------

    def load(self, family: str, name: str) -> PluginSpec:
        """Import the plugin ``family``/``name`` (and nothing else) and return its spec."""
        _check_family(family)
        key = (family, name)
        if key in self._loaded:
            return self._loaded[key]
        candidates = [i for i in self.discover(family) if i.name == name]
        if not candidates:
            installed = self.names(family)
            listing = ", ".join(installed) if installed else "none"
            published = PUBLISHED.get(family, {})
            if name in published:
                raise Dsr1Error(f"no {family} plugin named {name!r} is installed (installed {family} plugins: "
                                f"{listing}); install it: `{pip_hint(family, name)}`")
            missing = sorted(set(published) - set(installed))
            more = f"; published by dsr1, not installed: {', '.join(missing)}" if missing else ""
            raise Dsr1Error(f"no {family} plugin named {name!r}{did_you_mean(name, [*installed, *published])} "
                            f"(installed {family} plugins: {listing}{more})")
        candidates = self._allowed(family, name, candidates)
        modules = self._import(family, name, candidates)
        claims: list[tuple[PluginSpec, EntryPointInfo]] = []
        for info, module in modules:
            claims.append((self._spec_from(family, name, info, module), info))
        spec, origin = self._pick(family, name, claims)
        self._loaded[key] = spec
        self._origin[key] = origin
        return spec

    def _allowed(self, family: str, name: str, candidates: list[EntryPointInfo]) -> list[EntryPointInfo]:
        """The candidates the allow-list lets ``load`` import, decided from metadata alone."""
        allowed = [(c, how) for c in candidates if (how := self.allowed_by(c))]
        if not allowed:
            dists = ", ".join(sorted({c.distribution for c in candidates}))
            raise Dsr1Error(
                f"{family} plugin {name!r} (from {dists}) is installed but not in DSR1_PLUGINS "
                f"({self.describe_allowlist()}); add {name!r} or its distribution there to use it"
            )
        if len(allowed) > 1 and any(how == "name" for _, how in allowed):
            # a name entry does not say which distribution is trusted: importing both would run
            # the code of one the user never chose, so the duplicate is refused before any import
            who = " and ".join(f"{c.distribution} {c.version}" for c, _ in allowed)
            dists = " or ".join(c.distribution for c, how in allowed if how != "core")
            core = "; the core's builtin needs no entry" if any(how == "core" for _, how in allowed) else ""
            raise Dsr1Error(
                f"two plugins claim {family} {name!r}: {who}; DSR1_PLUGINS allows the name, not a distribution, "
                f"so neither was imported; put the distribution you trust in DSR1_PLUGINS instead ({dists}){core}"
            )
        return [c for c, _ in allowed]

    def origin(self, family: str, name: str) -> EntryPointInfo:
        """The distribution a loaded plugin came from."""
        return self._origin[(family, name)]

    def _import(
        self, family: str, name: str, candidates: list[EntryPointInfo]
    ) -> list[tuple[EntryPointInfo, ModuleType]]:
        failures: list[tuple[Any, BaseException]] = []

        def on_failure(_manager: Any, entrypoint: Any, error: BaseException) -> None:
            failures.append((entrypoint, error))

        wanted = {(c.distribution, c.value) for c in candidates}  # only what the allow-list let through
        entry_points = [
            ep for ep in importlib_metadata.entry_points(group=f"dsr1.{family}", name=name)
            if (ep.dist.name if ep.dist is not None else "?", ep.value) in wanted
        ]
        manager = _fresh_named_manager()(
            entry_points=entry_points,
            namespace=f"dsr1.{family}",
            names=[name],
            invoke_on_load=False,
            on_load_failure_callback=on_failure,
        )
        if failures:
            entrypoint, error = failures[0]
            info = next((c for c in candidates if c.value == entrypoint.value), candidates[0])
            others = [n for n in self.names(family) if n != name]
            raise Dsr1Error(
                f"{family} plugin {name!r} from {info.distribution} {info.version} failed to import: "
                f"{type(error).__name__}: {error}; installed alternatives: {', '.join(others) or 'none'}; "
                f"reinstall it with `pip install --force-reinstall {info.distribution}`"
            ) from error
        loaded: list[tuple[EntryPointInfo, ModuleType]] = []
        for ext in manager.extensions:
            info = next((c for c in candidates if c.value == ext.entry_point.value), candidates[0])
            loaded.append((info, ext.plugin))
        if not loaded:
            raise Dsr1Error(f"{family} plugin {name!r} could not be loaded from {candidates[0].distribution}")
        return loaded

    def _register(self, info: EntryPointInfo, module: Any) -> None:
        if self.pm.is_registered(module):
            return
        try:
            self.pm.register(module, name=f"{info.distribution}:{getattr(module, '__name__', info.value)}")
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            raise Dsr1Error(
                f"{info.family} plugin {info.name!r} from {info.distribution} {info.version} has an invalid hook: "
                f"{str(err).splitlines()[0]}; hooks are named dsr1_<family> and take the arguments "
                f"documented in dsr1.hookspecs"
            ) from None

    def _spec_from(self, family: str, name: str, info: EntryPointInfo, module: Any) -> PluginSpec:
        self._register(info, module)
        others = [p for p in self.pm.get_plugins() if p is not module]
        caller = self.pm.subset_hook_caller(f"dsr1_{family}", remove_plugins=others)
        records: list[Any] = []
        for result in caller():
            records.extend(result if isinstance(result, (list, tuple)) else [result])
        where = f"{family} plugin {name!r} from {info.distribution} {info.version}"
        specs = [r for r in records if isinstance(r, PluginSpec) and r.name == name]
        if not specs:
            got = ", ".join(repr(getattr(r, "name", r)) for r in records) or "nothing"
            raise Dsr1Error(
                f"{where}: its dsr1_{family} hook returned {got}, not a PluginSpec named {name!r} "
                f"(the entry-point name must equal the spec name)"
            )
        spec = specs[0]
        if spec.api_version not in SUPPORTED_API_VERSIONS:
            raise Dsr1Error(
                f"{where} declares plugin API version {spec.api_version}, but this dsr1 supports "
                f"{', '.join(map(str, sorted(SUPPORTED_API_VERSIONS)))}; install a release of "
                f"{info.distribution} written for API {max(SUPPORTED_API_VERSIONS)}"
            )
        if spec.family != family:
            raise Dsr1Error(f"{where} registered a spec of family {spec.family!r}")
        from dsr1.interfaces import BASE_CLASSES

        base = BASE_CLASSES[family]
        if not (isinstance(spec.impl, type) and issubclass(spec.impl, base)):
            raise Dsr1Error(f"{where}: impl {spec.impl!r} is not a subclass of dsr1.interfaces.{base.__name__}")
        return spec

    def _pick(
        self, family: str, name: str, claims: list[tuple[PluginSpec, EntryPointInfo]]
    ) -> tuple[PluginSpec, EntryPointInfo]:
        if len(claims) == 1:
            return claims[0]
        overriding = [c for c in claims if c[0].overrides]
        if len(overriding) == 1:
            return overriding[0]
        who = " and ".join(f"{i.distribution} {i.version}" for _, i in claims)
        raise Dsr1Error(
            f"two plugins claim {family} {name!r}: {who}; uninstall one, or mark the one that should win "
            f"with PluginSpec(overrides=True)"
        )

    # --- building a pipeline --------------------------------------------------------------

    def make(self, family: str, choice: PluginChoice, **extra: Any) -> Any:
        """Load ``choice`` and instantiate it with validated options."""
        spec = self.load(family, choice.name)
        try:
            options = spec.options.model_validate(choice.options)
        except ValidationError as err:
            raise Dsr1Error(format_validation_error(err, spec.options, prefix=f"{family}.options.")) from None
        return spec.make(options, **extra)

    def resolve(self, config: EngineConfig) -> Pipeline:
        """Resolve every family of ``config`` into plain objects, once."""
        parts: dict[str, Any] = {}
        chosen: dict[str, Any] = {}  # the effective choice of each family (what describe() reports)
        selection = None
        for family in FAMILIES:
            if family == "model":
                continue  # picked per checkpoint, see Pipeline.model_builder
            choice = config.choice(family)
            if family == "device" and choice is not None and choice.name == "auto":
                parts[family], selection = device_select.select_device(self, choice.options)
                continue
            hw = config.hardware
            if family == "graph" and selection is not None and config.graph is None and hw is not None \
                    and hw.optimizer.kernel_fusion:  # fusion for the device auto picked, not for "auto"
                choice = fusion_choice(selection.chosen, hw.optimizer.tiling_strategy, hw.optimizer.fallback)
            parts[family] = self.make(family, choice) if choice is not None else None
            if choice is not None:
                chosen[family] = choice
        if config.extra_devices and not parts["pool"].use_devices(list(config.extra_devices)):
            written = ", ".join([config.device.name if config.device else "?", *config.extra_devices])
            raise Dsr1Error(f"device [{written}] lets a pool run modules on {', '.join(config.extra_devices)} too, "
                            f"but pool {chosen['pool'].name!r} keeps every module on the compute device; "
                            f"use pool: tiered")
        if parts.get("pruning") is not None:  # it prunes at load: refuse now what could not (config check too)
            from dsr1.pruning.at_load import check_load_pruning

            check_load_pruning(parts["pruning"], chosen["pruning"].name)
        self.pm.hook.dsr1_configure(config=config)
        return Pipeline(config=config, registry=self, device_selection=selection, choices=chosen, **parts)

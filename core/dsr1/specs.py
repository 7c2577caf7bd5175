"""Typed records that plugins return from their registration hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

#: The plugin API version this core implements. A plugin declares the version it was
#: written against; the core accepts any version in ``SUPPORTED_API_VERSIONS``.
API_VERSION = 1
SUPPORTED_API_VERSIONS: frozenset[int] = frozenset({1})


class NoOptions(BaseModel):
    """Options model of a plugin that takes none (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin registers: one named implementation of one family.

    :param name: the name users write in config; equals the entry-point name.
    :param family: one of :data:`dsr1.hookspecs.FAMILIES`.
    :param impl: the implementation class (subclass of the family's base class).
    :param api_version: plugin API version the plugin was written against.
    :param options: pydantic model validating ``{"name": ..., "options": {...}}``.
    :param capabilities: optional features the implementation declares; the conformance
        kit tests each one, and a declared capability that fails is a failure.
    :param overrides: set when this plugin deliberately replaces another plugin of the
        same name (for example a faster ``sdpa``); otherwise two claims are an error.
    :param description: one line for ``dsr1 plugins list``.
    """

    name: str
    family: str
    impl: type[Any]
    api_version: int = API_VERSION
    options: type[BaseModel] = NoOptions
    capabilities: frozenset[str] = field(default_factory=frozenset)
    overrides: bool = False
    description: str = ""

    def make(self, options: dict[str, Any] | BaseModel | None = None, **extra: Any) -> Any:
        """Instantiate the implementation with validated options."""
        if not isinstance(options, BaseModel):
            options = self.options.model_validate(options or {})
        return self.impl(options, **extra)

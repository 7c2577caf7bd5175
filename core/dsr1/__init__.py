"""dsr1: an LLM inference engine in which every stage is a swappable plugin.

The public API is imported lazily so that ``import dsr1`` (and the CLI's plugin
listing) stays cheap and imports no plugin and no torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AutoModel": "dsr1.auto",
    "AutoTokenizer": "dsr1.auto",
    "EngineConfig": "dsr1.config",
    "load_config": "dsr1.config",
    "PluginRegistry": "dsr1.registry",
    "PluginSpec": "dsr1.specs",
    "Dsr1Error": "dsr1.errors",
    "hookimpl": "dsr1.hookspecs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsr1' has no attribute {name!r}")

"""Which distribution ships which plugin: the ``pip install`` hints of error messages.

Below the registry, so that what reports a missing plugin (the registry, ``device: auto``) needs
nothing but metadata to say what to install.
"""
from __future__ import annotations

import functools

import importlib_metadata

#: The distribution that ships the core's builtins (they need no separate pip install). Its
#: plugins are always allowed, whatever ``DSR1_PLUGINS`` says: without them nothing runs.
CORE_DISTRIBUTION = "dsr1"


#: the plugins dsr1 publishes as distributions of their own: family → entry-point name → distribution.
#: A hint names ``pip install`` only for these (a test checks the table against ``plugins/*/*/pyproject.toml``);
#: for any other name it lists them, since a made-up ``dsr1-<family>-<typo>`` would send users to a name
#: anyone could register on PyPI.
PUBLISHED: dict[str, dict[str, str]] = {
    "attention": {n: f"dsr1-attention-{n}" for n in ("eager", "linear", "sdpa", "sliding")},
    "device": {n: f"dsr1-device-{n}" for n in ("cpu", "cuda", "mlu", "npu")},
    "pruning": {n: f"dsr1-pruning-{n}" for n in ("magnitude", "semi24", "structured", "wanda")},
    "quant": {**{n: f"dsr1-quant-{n}" for n in ("dynamic", "fp8", "int4", "int8", "w8a8")},
              **{n: "dsr1-quant-float" for n in ("fp32", "fp16", "bf16")}},
}


def pip_hint(family: str, name: str) -> str:
    """What to install for plugin ``family``/``name``: ``pip install <its distribution>`` when dsr1
    publishes it, else the names that are published (never a guessed distribution name)."""
    dist = PUBLISHED.get(family, {}).get(name)
    if dist is not None:
        return f"pip install {dist}"
    if name in _core_builtins(family):
        return f"'{name}' ships with dsr1 itself: pip install --force-reinstall dsr1"
    known = sorted(PUBLISHED.get(family, {}))
    if known:
        return f"no published {family} plugin is named {name!r}; published: {', '.join(known)}"
    return f"dsr1 publishes no separate {family} plugins; a third-party one names its own distribution"


@functools.cache
def _core_builtins(family: str) -> frozenset[str]:
    """Entry-point names the core distribution itself declares in ``dsr1.<family>`` (metadata only)."""
    try:
        eps = importlib_metadata.distribution(CORE_DISTRIBUTION).entry_points
    except importlib_metadata.PackageNotFoundError:
        return frozenset()
    return frozenset(ep.name for ep in eps if ep.group == f"dsr1.{family}")

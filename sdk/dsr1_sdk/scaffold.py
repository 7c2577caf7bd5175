"""``new_plugin``: write a complete, installable plugin package from the SDK's templates.

The generated package works as it is: it installs with pip, registers its entry point,
and its tests (one class subclassing the family's conformance kit) pass. The CLI's
``dsr1 plugins new --family F --name N --dir D`` calls :func:`new_plugin`.

Layout written under ``directory``::

    pyproject.toml                    dsr1-<family>-<name>, entry point dsr1.<family> / <name>
    README.md
    dsr1_<family>_<name>/__init__.py  a working implementation and its dsr1_<family> hookimpl
    tests/test_dsr1_<family>_<name>.py

Templates live in ``dsr1_sdk/templates/<family>/`` (the module and README) and
``dsr1_sdk/templates/common/`` (pyproject and tests), rendered with :class:`string.Template`.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from dsr1.errors import Dsr1Error

#: Families with a template, and the conformance kit their tests subclass.
SCAFFOLD_FAMILIES: dict[str, str] = {
    "attention": "AttentionConformance",
    "device": "DeviceConformance",
    "quant": "QuantConformance",
    "pruning": "PruningConformance",
    "decoding": "DecodingConformance",
    "kvcache": "KVCacheConformance",
    "graph": "GraphConformance",
    "monitor": "MonitorConformance",
    "scheduler": "SchedulerConformance",
}

#: What the generated implementation starts as, per family (the spec's description).
DESCRIPTIONS: dict[str, str] = {
    "attention": "softmax attention (GQA, boolean masks, fp32 softmax), ready to be replaced",
    "device": "a CPU-backed device, ready to be bound to real hardware",
    "quant": "int8 weight-only fake quantization, symmetric per output channel",
    "pruning": "unstructured magnitude pruning with exact sparsity",
    "decoding": "greedy and sampled decoding (temperature, top-k, top-p, min-p, penalties), per request",
    "kvcache": "preallocated per-layer key/value tensors, updated in place",
    "graph": "the model's own decode step behind a wrapper, ready to be compiled",
    "monitor": "an in-memory event log with per-event counts and sums",
    "scheduler": "FIFO batches run to completion, KV blocks reserved up front",
}

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


def check_name(name: str) -> str:
    """Validate a plugin name; returns its import-name form (dashes → underscores)."""
    if not NAME_PATTERN.fullmatch(name):
        raise Dsr1Error(
            f"invalid plugin name {name!r}: use lowercase letters, digits and single dashes, "
            "starting with a letter (e.g. 'flash2', 'my-attn')"
        )
    return name.replace("-", "_")


def class_prefix(name: str) -> str:
    """``"my-attn"`` → ``"MyAttn"`` (the class is then ``MyAttnAttention``)."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("-"))


def _template(*parts: str) -> Template:
    return Template(resources.files("dsr1_sdk").joinpath("templates", *parts).read_text(encoding="utf-8"))


def render(family: str, name: str) -> dict[str, str]:
    """The generated files, relative path → text, without writing anything."""
    if family not in SCAFFOLD_FAMILIES:
        raise Dsr1Error(
            f"cannot scaffold a {family!r} plugin; supported families: {', '.join(SCAFFOLD_FAMILIES)}"
        )
    stem = check_name(name)
    from dsr1_sdk import __version__

    module = f"dsr1_{family}_{stem}"
    values = {
        "name": name,
        "family": family,
        "module": module,
        "dist": f"dsr1-{family}-{name}",
        "cls": class_prefix(name),
        "kit": SCAFFOLD_FAMILIES[family],
        "description": DESCRIPTIONS[family],
        "sdk_version": __version__,
    }
    return {
        "pyproject.toml": _template("common", "pyproject.toml.tmpl").substitute(values),
        "README.md": _template(family, "README.md.tmpl").substitute(values),
        f"{module}/__init__.py": _template(family, "module.py.tmpl").substitute(values),
        f"tests/test_{module}.py": _template("common", "test.py.tmpl").substitute(values),
    }


def new_plugin(family: str, name: str, directory: Path) -> Path:
    """Write a ``family`` plugin called ``name`` into ``directory``; returns the directory.

    :raises Dsr1Error: unsupported family, invalid name, or ``directory`` exists and is not empty.
    """
    files = render(family, name)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise Dsr1Error(f"{str(directory)!r} exists and is not an empty directory; pick a new --dir")
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory

"""Typed reads of ``config.json`` fields for the model builders.

A field of the wrong type or out of range is one line that names the field, the value and what it
must be (``config.json vocab_size must be a positive integer, got 'big'``), before any weights are read.
An absent or ``null`` optional field takes its default, as transformers does; an absent required one is
named as missing.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dsr1.errors import Dsr1Error, did_you_mean, quote

#: marks a field without a default: it must be there
REQUIRED: Any = object()

#: dtype names a ``config.json`` usually holds (for the "did you mean" hint; any torch dtype name is accepted)
COMMON_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _name(where: str, key: str) -> str:
    """``config.json vocab_size``; a ``where`` ending in a dot names a nested field (``rope_scaling.factor``)."""
    return f"{where}{key}" if where.endswith(".") else f"{where} {key}"


def _get(hf: Mapping[str, Any], key: str, default: Any, where: str) -> tuple[Any, bool]:
    """``(value, True)``, or ``(default, False)`` for an optional field that is absent or null."""
    if key not in hf and default is REQUIRED:
        raise Dsr1Error(f"{where.rstrip('.')} lacks {key!r}, which a {hf.get('model_type')} model needs")
    value = hf.get(key)
    return (default, False) if value is None and default is not REQUIRED else (value, True)


def integer(hf: Mapping[str, Any], key: str, default: Any = REQUIRED, minimum: int = 1,
            where: str = "config.json") -> Any:
    """``hf[key]`` as an int ``>= minimum`` (a float like ``4.0`` is that int; ``4.5`` is refused)."""
    value, given = _get(hf, key, default, where)
    if not given:
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise Dsr1Error(f"{_name(where, key)} must be {what}, got {quote(value)}")
    return value


def positive_number(hf: Mapping[str, Any], key: str, default: Any = REQUIRED, where: str = "config.json") -> Any:
    """``hf[key]`` as a finite float ``> 0`` (rope_theta, rms_norm_eps, scaling factors)."""
    value, given = _get(hf, key, default, where)
    if not given:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise Dsr1Error(f"{_name(where, key)} must be a positive number, got {quote(value)}")
    return float(value)


def flag(hf: Mapping[str, Any], key: str, default: bool, where: str = "config.json") -> bool:
    """``hf[key]`` as a bool: ``"false"`` (a string) would be true under ``bool()``, so it is refused."""
    value, _ = _get(hf, key, default, where)
    if not isinstance(value, bool):
        raise Dsr1Error(f"{_name(where, key)} must be true or false, got {quote(value)}")
    return value


def token_ids(hf: Mapping[str, Any], key: str, where: str = "config.json") -> list[int] | None:
    """``hf[key]`` (``eos_token_id``): a token id or a list of them; None when absent."""
    value = hf.get(key)
    if value is None:
        return None
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise Dsr1Error(f"{_name(where, key)} must be a token id (an integer >= 0) or a list of them, "
                        f"got {quote(value)}")
    return list(ids)


def check_dtype(hf: Mapping[str, Any], key: str, where: str = "config.json") -> None:
    """``hf[key]`` (``torch_dtype``, ``dtype``) is a torch dtype name (``bfloat16``, ``torch.float16``)
    or ``auto``, as transformers reads it; the weights' own dtype decides what is loaded."""
    value = hf.get(key)
    if value is None:
        return
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name == "auto" or (name is not None and isinstance(getattr(torch, name, None), torch.dtype)):
        return
    hint = did_you_mean(name, COMMON_DTYPES) if name is not None else "; use one of " + ", ".join(COMMON_DTYPES)
    raise Dsr1Error(f"{_name(where, key)} must be a torch dtype name or 'auto', got {quote(value)}{hint}")

"""One exception type for every user-facing error.

Messages are a single line that names what is wrong and what would be right. The CLI
prints them without a traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class Dsr1Error(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to ``word`` (for 'did you mean' hints)."""
    candidates = sorted(set(candidates))
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    return found


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ready-to-append hint: ``"; did you mean 'x'?"`` or the list of valid names."""
    candidates = sorted(set(candidates))
    found = closest(word, candidates)
    if found:
        return "; did you mean " + " or ".join(repr(f) for f in found) + "?"
    if candidates:
        return "; valid: " + ", ".join(candidates)
    return ""

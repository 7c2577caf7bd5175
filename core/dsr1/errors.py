"""One exception type for every user-facing error.

Messages are a single line that names what is wrong and what would be right. The CLI
prints them without a traceback unless ``--debug`` is given. A message never grows with
the input it complains about: past :data:`MAX_MESSAGE_CHARS` it is cut in the middle (the
start says what is wrong, the end usually says what would be right), and :func:`quote`
cuts a user value before it goes into a message.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

#: longest message kept whole. Real messages stay under a few hundred characters; anything
#: longer quotes user input (a 100 MB config value must not become a 100 MB error line).
MAX_MESSAGE_CHARS = 1000
#: how much of a cut message is kept from its start and from its end.
_HEAD, _TAIL = 700, 250
#: words longer than this get no "did you mean" (no valid name is that long; difflib is quadratic).
_MAX_SUGGEST_CHARS = 200


def cap_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` on one line, cut in the middle with a note of its length when over ``limit``."""
    line = " ".join(message.splitlines())
    if len(line) <= limit:
        return line
    head, tail = limit * _HEAD // MAX_MESSAGE_CHARS, limit * _TAIL // MAX_MESSAGE_CHARS
    return f"{line[:head]} ... [message of {len(line)} characters cut] ... {line[-tail:]}"


def quote(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the full length noted."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr would be long, or refused past 4300 digits
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int inside past Python's digit limit, a structure nested too deep
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class Dsr1Error(Exception):
    """A user-facing error with a one-line message (cut past :data:`MAX_MESSAGE_CHARS`)."""

    def __init__(self, message: str) -> None:
        super().__init__(cap_message(str(message)))


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to ``word`` (for 'did you mean' hints)."""
    candidates = sorted(set(candidates))
    if len(word) > _MAX_SUGGEST_CHARS:
        return []
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

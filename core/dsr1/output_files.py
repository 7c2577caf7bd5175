"""The one way dsr1 writes a single output file (a JSON report, a PNG chart, a JSONL trace), and the one rule for
replacing one: :mod:`dsr1.outputs`'s rule for directories, for one file.

* **What may be replaced.** A file is written where nothing is, or over a previous output of dsr1, recognised
  by its mark: a JSON report whose ``writer`` (or ``command``) names dsr1, a PNG whose ``Software`` text chunk
  does. Anything else (a user's notes, a directory, a link, a device) is refused with one line naming the flag:
  ``--output`` never replaces a file that dsr1 did not write.
* **Checked before the work.** :func:`check_output` is called when the arguments are read, so a long benchmark
  does not end in a refusal; :func:`write_atomic` checks again when it writes.
* **Atomic.** The file is written beside itself (``.NAME.tmp-PID``) and renamed over the final name: a reader
  or a kill sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsr1.errors import Dsr1Error

#: what a dsr1 report's ``writer`` (or ``command``) starts with, and a dsr1 chart's ``Software`` chunk holds.
MARK = "dsr1"
_COMMANDS = ("dsr1 ", "python -m dsr1", "python3 -m dsr1")
_HEAD = 1 << 16  # matplotlib writes its text chunks before the image data


def is_dsr1_report(data: Any) -> bool:
    """Whether a parsed JSON document is a dsr1 report: an object whose ``writer`` names dsr1, or whose
    ``command`` is a dsr1 command (reports written before ``writer`` existed)."""
    if not isinstance(data, dict):
        return False
    writer, command = data.get("writer"), data.get("command")
    return (isinstance(writer, str) and writer.startswith(MARK)) or \
        (isinstance(command, str) and command.startswith(_COMMANDS))


def _own_json(path: Path) -> bool:
    try:
        return is_dsr1_report(json.loads(path.read_bytes()))
    except (OSError, ValueError):  # unreadable, not JSON, not UTF-8
        return False


def _own_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(_HEAD)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + MARK.encode() in head


def owned(path: Path, own: Callable[[Path], bool] | None = None) -> bool:
    """Whether the regular file ``path`` is a previous dsr1 output (``own`` decides for other kinds of file)."""
    if own is not None:
        return own(path)
    return _own_png(path) if path.suffix.lower() == ".png" else _own_json(path)


def check_output(path: str | os.PathLike[str], flag: str, own: Callable[[Path], bool] | None = None) -> Path:
    """``path`` if dsr1 may write it (module docstring); else one line naming ``flag`` and what would do."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        what = "a directory" if p.is_dir() and not p.is_symlink() else "not a regular file"
        raise Dsr1Error(f"{flag} {str(p)!r} is {what}; pass the path of a file to write")
    if p.exists() and not owned(p, own):
        raise Dsr1Error(f"{flag} {str(p)!r} exists and was not written by dsr1; pass another path or move it away")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise Dsr1Error(f"{flag} {str(p)!r} cannot be written: {str(parent)!r} is not a writable directory")
    return p


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], Any], flag: str = "--output",
                 own: Callable[[Path], bool] | None = None) -> None:
    """Write ``path`` through ``write(tmp)`` into a temp file beside it, then rename it into place (after the
    checks of :func:`check_output`, again: the file may have appeared while the work ran)."""
    p = check_output(path, flag, own)
    p.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(p, write)


def replace_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into ``.NAME.tmp-PID`` beside ``path``, then rename it over ``path``: whole or not at all.
    No checks: the caller has decided that ``path`` may be replaced (:func:`write_atomic` checks first)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], text: str, flag: str = "--output") -> None:
    """A report's JSON ``text`` to ``path`` by :func:`write_atomic`."""
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), flag)

"""Reading the files a user points dsr1 at: regular files only, every failure one line.

A model directory is user input. Anything in it may be a FIFO (``open`` blocks until a
writer appears, so the loader would hang), a device, a directory, a dangling symlink, a
symlink loop, or unreadable; ``pathlib``'s ``is_file``/``exists`` answer ``False`` for
some of these (a FIFO ``config.json`` would read as "no config.json") and raise for others
(``PermissionError``). These helpers say which, naming the path.

:func:`open_regular` opens with ``O_NONBLOCK`` and checks the opened descriptor, so a file
swapped for a FIFO between a check and the open cannot block either.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from dsr1.errors import Dsr1Error

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def kind(mode: int) -> str:
    """``"regular file"``, ``"directory"``, ``"FIFO (named pipe)"``, ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def describe(err: OSError) -> str:
    """The cause of an ``OSError`` in words a user can act on."""
    if err.errno == errno.ELOOP:
        return "symlink loop (a symlink that leads back to itself)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return err.strerror or type(err).__name__


def _dangling(path: Path, what: str) -> None:
    if os.path.islink(path):
        target = os.readlink(path)
        raise Dsr1Error(f"{what} {str(path)!r} is a dangling symlink (to {target!r}, which does not exist)")


def probe(path: Path, what: str) -> os.stat_result | None:
    """``stat`` of ``path`` following symlinks; ``None`` when nothing is there.

    Something there that cannot be reached (a dangling symlink, a symlink loop, no
    permission) is a one-line error naming ``what`` and the path, not "not found".
    """
    try:
        return os.stat(path)
    except FileNotFoundError:
        _dangling(path, what)
        return None
    except NotADirectoryError:
        return None  # a parent is a file: nothing can be at this path
    except OSError as err:
        raise Dsr1Error(f"cannot read {what} {str(path)!r}: {describe(err)}") from None


def is_regular(path: Path, what: str) -> bool:
    """Whether a readable regular file is at ``path``: ``False`` when nothing is there, an
    error when something else is (a FIFO, a directory, ...)."""
    st = probe(path, what)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, what, st.st_mode)
    return True


def _not_regular(path: Path, what: str, mode: int) -> Dsr1Error:
    return Dsr1Error(
        f"{what} {str(path)!r} is a {kind(mode)}, not a regular file; dsr1 reads models only from regular "
        f"files (a FIFO or device could block the loader forever)"
    )


def open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for binary reading, or a one-line error when it is not a regular file."""
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer;
    # a regular file ignores the flag. The check is on the descriptor, so it cannot race.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        _dangling(path, what)
        raise Dsr1Error(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise Dsr1Error(f"cannot read {what} {str(path)!r}: {describe(err)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file (``UnicodeDecodeError`` is left to the caller, who knows the format)."""
    with open_regular(path, what) as f:
        try:
            data = f.read()
        except OSError as err:
            raise Dsr1Error(f"cannot read {what} {str(path)!r}: {describe(err)}") from None
    return data.decode("utf-8")


def list_dir(path: Path, what: str) -> list[str]:
    """The names in directory ``path`` (sorted), or a one-line error when it cannot be listed."""
    try:
        return sorted(os.listdir(path))
    except OSError as err:
        raise Dsr1Error(f"cannot list {what} {str(path)!r}: {describe(err)}") from None

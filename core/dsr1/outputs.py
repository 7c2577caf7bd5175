"""The one way dsr1 writes an output directory, and the one rule for replacing one.

``dsr1 quantize``, ``dsr1 prune`` and ``save_pretrained`` write through :func:`plan_output`:

* **What may be replaced.** An output dir is written when it does not exist, is empty, or holds
  nothing but a previous output of the same command, recognised by the marker file
  ``.dsr1-output.json`` at its top (command, dsr1 version, the names written). Replacing a
  previous output needs ``overwrite``. A dir that is, or contains, an input (the model dir) is
  never replaced, nor one that holds anything dsr1 did not write (the current dir, home and ``/``
  included): ``--overwrite`` never deletes a file that dsr1 did not write.
* **Checked before the work.** :func:`plan_output` follows symlinks (a symlinked output dir is
  written at its target and the link is kept), refuses files in the way, and proves the location
  writable by creating and removing a hidden dir there: before any model is loaded.
* **Atomic.** The output is built in a hidden sibling ``.dsr1-tmp-<name>-*`` and renamed into
  place; a previous output is swapped with it in one step (``renameat2(RENAME_EXCHANGE)`` on
  Linux; elsewhere two renames through ``.dsr1-old-<name>-*``) and deleted afterwards. A kill
  leaves the previous output or the new one under the final name, never a mix. The current dir,
  home, ``/`` and mount points cannot be renamed, so they are filled entry by entry (their marker
  says ``incomplete`` meanwhile).
* **Leftovers.** Build and old dirs carry a marker, deleted last; the next write in the same place
  removes those of interrupted runs (a build dir whose writer is still running is left alone).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import functools
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsr1 import __version__
from dsr1.errors import Dsr1Error

MARKER = ".dsr1-output.json"
#: The marker is written beside itself first and renamed, so it is never half a document.
MARKER_TMP = MARKER + ".tmp"
TMP_PREFIX = ".dsr1-tmp-"
OLD_PREFIX = ".dsr1-old-"
#: Format of the marker; JSON without this key is not dsr1's.
FORMAT = 1
_MARKER_MAX = 1 << 16  # a marker is a few hundred bytes; anything larger is not ours
#: ``write`` errors of a full or failing disk: one line instead of a traceback.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker at the top of ``directory``, or None (none, not a regular file, not dsr1's)."""
    path = directory / MARKER
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_MAX:  # never open a FIFO or a huge file
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return data if isinstance(data, dict) and data.get("dsr1_output") == FORMAT else None


def write_marker(directory: Path, info: dict[str, Any]) -> None:
    """Write the marker of ``directory`` (atomically: a temp file renamed over it)."""
    data = {"dsr1_output": FORMAT, "dsr1": __version__, **info}
    tmp = directory / MARKER_TMP
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MARKER)


@dataclass
class OutputPlan:
    """A checked output location; :meth:`writing` builds the output and puts it in place."""

    given: Path  #: as the user wrote it (for messages)
    path: Path  #: where the output goes: absolute, symlinks followed
    command: str
    overwrite: bool
    label: str = "--output-dir"
    flag: str = "--overwrite"
    #: ``name -> bool``: what this command writes at the top of its dir (default: the marker's list)
    owns: Callable[[str], bool] | None = None
    in_place: bool = False

    # --- the rule ---------------------------------------------------------------------------------

    def check_inputs(self, inputs: Iterable[str | os.PathLike[str]]) -> None:
        """Refuse an output that is, or contains, one of ``inputs`` (symlinks followed)."""
        for item in inputs:
            try:
                real = Path(item).expanduser().resolve()
            except (OSError, RuntimeError):  # an input that cannot be resolved is named by its own check
                continue
            if not os.path.lexists(real):
                continue
            if real == self.path:
                raise Dsr1Error(f"{self._name()} is the model dir itself; write to a new dir elsewhere")
            if self.path in real.parents:
                raise Dsr1Error(f"{self._name()} contains the input {_quote(str(item))}; replacing the dir would "
                                f"delete it: write to a new or empty dir that does not contain it")

    def check_content(self) -> list[str]:
        """The names a replace will remove (empty: nothing to replace); one-line error if it may not."""
        if _stat(self.path, self) is None:
            return []
        try:
            names = sorted(n for n in os.listdir(self.path) if not _is_leftover(self.path / n))
        except OSError as err:
            raise Dsr1Error(f"{self._name()} cannot be listed ({err.strerror}); choose a dir you can read") from None
        if not names:
            return []
        marker = read_marker(self.path)
        cmd = self.command
        if marker is None:
            theirs = [n for n in names if self.owns is None or not self.owns(n)]
            if not theirs:  # the names of our output, but no marker: written by an older dsr1, or by hand
                raise Dsr1Error(f"{self._name()} holds no {MARKER} marker, so dsr1 cannot tell that it wrote "
                                f"{_list(names)}; delete it yourself or choose another dir")
            raise Dsr1Error(self._foreign(theirs))
        if marker.get("command") != cmd:
            other = _quote(str(marker.get("command")))
            raise Dsr1Error(f"{self._name()} holds a dsr1 {other} output, not a dsr1 {cmd} one; "
                            f"choose another dir, or delete it yourself")
        listed = marker.get("files")
        files = set(listed) if isinstance(listed, list) else set()
        theirs = [n for n in names if n not in (MARKER, MARKER_TMP)
                  and not (self.owns(n) if self.owns is not None else n in files)]
        if theirs:
            raise Dsr1Error(self._foreign(theirs))
        if not self.overwrite:
            raise Dsr1Error(f"{self._name()} holds a previous dsr1 {cmd} output; pass {self.flag} to replace it, "
                            f"or choose another dir")
        return names

    def _name(self) -> str:
        return f"{self.label} {_quote(str(self.given))}"

    def _foreign(self, names: list[str]) -> str:
        where = _special(self.path)
        if where:
            return (f"{self._name()} is {where} and holds files dsr1 {self.command} did not write ({_list(names)}); "
                    f"write to a new dir instead, e.g. {self.label} ./{self.command}-out")
        return (f"{self._name()} holds files dsr1 {self.command} did not write ({_list(names)}); {self.flag} only "
                f"replaces a previous dsr1 {self.command} output: choose a new or empty dir")

    # --- writing ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A new hidden dir to build the output in; put in place when the block ends without error."""
        parent = self.path if self.in_place else self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Dsr1Error(f"{self._name()} cannot be created ({err.strerror}); choose a writable location") from None
        clean_leftovers(parent)
        if not self.in_place and _stat(self.path, self) is not None:
            clean_leftovers(self.path)  # an earlier in-place write there (e.g. it was the current dir then)
        tmp = _make_dir(parent, f"{TMP_PREFIX}{self.path.name}-", {"state": "building", "command": self.command})
        try:
            try:
                yield tmp
                self._publish(tmp)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and err.filename in (str(tmp), str(self.path)):
                    raise Dsr1Error(f"{self._name()} changed while dsr1 {self.command} was writing it (something "
                                    f"else wrote there); nothing was replaced: run again") from err
                if err.errno not in _DISK_ERRNOS:
                    raise
                where = f" ({err.filename})" if err.filename else ""
                raise Dsr1Error(f"writing {self._name()} failed: {err.strerror}{where}; nothing was replaced") from err
        except BaseException:
            _remove(tmp)
            raise

    def claim(self) -> Path:
        """Put an empty output (only the marker) in place now, for a command that fills it as it goes."""
        with self.writing():
            pass
        return self.path

    def _publish(self, tmp: Path) -> None:
        previous = self.check_content()  # again: the dir may have changed during the work
        names = sorted(n for n in os.listdir(tmp) if n not in (MARKER, MARKER_TMP))
        info = {"command": self.command, "files": names,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if self.in_place:
            self._publish_in_place(tmp, names, previous, info)
            return
        write_marker(tmp, info)
        if not previous:  # absent or empty: rename replaces an empty dir atomically
            os.rename(tmp, self.path)
        elif _exchange(tmp, self.path):
            _remove(tmp)  # tmp now holds the previous output
        else:
            old = self.path.parent / f"{OLD_PREFIX}{self.path.name}-{os.urandom(4).hex()}"
            os.rename(self.path, old)
            os.rename(tmp, self.path)
            _remove(old)

    def _publish_in_place(self, tmp: Path, names: list[str], previous: list[str], info: dict[str, Any]) -> None:
        target = self.path
        # list every name first: a kill part-way leaves a dir the next run still recognises as its own
        write_marker(target, {**info, "files": sorted({*previous, *names} - {MARKER, MARKER_TMP}),
                              "state": "incomplete"})
        old = None
        moving = [n for n in previous if n not in (MARKER, MARKER_TMP)]
        if moving:
            old = _make_dir(target, f"{OLD_PREFIX}{target.name}-", {"state": "old", "command": self.command})
            for n in moving:
                os.rename(target / n, old / n)
        for n in names:
            os.rename(tmp / n, target / n)
        write_marker(target, info)
        _remove(tmp)
        if old is not None:
            _remove(old)


def plan_output(
    out: str | os.PathLike[str],
    command: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    label: str = "--output-dir",
    flag: str = "--overwrite",
    owns: Callable[[str], bool] | None = None,
) -> OutputPlan:
    """Check where ``command`` will write, before any work; one-line :class:`Dsr1Error` if it may not.

    ``inputs`` are paths the output must not be or contain (more can be added with
    :meth:`OutputPlan.check_inputs` once a model name is resolved); ``label`` and ``flag`` are how
    messages name the output and the overwrite switch; ``owns`` says which names at the top of the
    dir the command writes (default: those listed in the marker).
    """
    given = Path(out).expanduser()
    try:
        path = given.resolve()  # symlinks followed: a symlinked output dir is written at its target
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        why = err.strerror if isinstance(err, OSError) else "a symlink loop"
        raise Dsr1Error(f"{label} {_quote(str(given))} cannot be resolved ({why}); choose another path") from None
    plan = OutputPlan(given=given, path=path, command=command, overwrite=overwrite, label=label, flag=flag, owns=owns)
    st = _stat(path, plan)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise Dsr1Error(f"{plan._name()} is a {_kind(st.st_mode)}, not a directory; choose a directory path")
    ancestor = path.parent if st is None else path
    while (ast := _stat(ancestor, plan)) is None:
        ancestor = ancestor.parent
    if not stat.S_ISDIR(ast.st_mode):
        raise Dsr1Error(f"{plan._name()} cannot be created: {_quote(str(ancestor))} is a {_kind(ast.st_mode)}, "
                        f"not a directory; choose a path under a directory")
    plan.in_place = st is not None and (_special(path) is not None or os.path.ismount(path))
    plan.check_inputs(inputs)
    plan.check_content()
    _probe(plan, path if plan.in_place else ancestor if st is None else path.parent)
    return plan


def clean_leftovers(directory: Path) -> None:
    """Remove the build and old dirs of interrupted writes in ``directory`` (not those still being written)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for name in entries:
        p = directory / name
        if _is_leftover(p) and not _live(p):
            _remove(p)


# --- helpers -------------------------------------------------------------------------------------


def _probe(plan: OutputPlan, where: Path) -> None:
    """Create and remove a hidden dir in ``where``: what the write will do first (works as root too)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}probe-", dir=where))
    except OSError as err:
        why = "read-only filesystem" if err.errno == errno.EROFS else err.strerror
        raise Dsr1Error(f"{plan._name()} is not writable: cannot create a directory in {_quote(str(where))} "
                        f"({why}); choose a writable location") from None


def _make_dir(parent: Path, prefix: str, info: dict[str, Any]) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, 0o777 & ~umask())  # mkdtemp makes 0700; an output gets the mode any new dir gets
    write_marker(d, {**info, "pid": os.getpid(), "host": socket.gethostname()})
    return d


def _is_leftover(p: Path) -> bool:
    """A build or old dir of ours: the name prefix and a marker (or nothing but a marker being written)."""
    if not p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
        return False
    try:
        if not stat.S_ISDIR(p.lstat().st_mode):
            return False
        return read_marker(p) is not None or set(os.listdir(p)) <= {MARKER, MARKER_TMP}
    except OSError:
        return False


def _live(p: Path) -> bool:
    """Whether the build dir ``p`` is being written by a running process on this host."""
    marker = read_marker(p) or {}
    pid = marker.get("pid")
    if marker.get("state") != "building" or marker.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _remove(d: Path) -> None:
    """Delete a dir of ours, its marker last, so an interrupted delete is still recognised as ours."""
    try:
        entries = os.listdir(d)
    except OSError:
        return
    for name in entries:
        if name == MARKER:
            continue
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    with contextlib.suppress(OSError):
        (d / MARKER).unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


@functools.cache
def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = _renameat2() if sys.platform == "linux" else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _stat(p: Path, plan: OutputPlan) -> os.stat_result | None:
    try:
        return p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise Dsr1Error(f"{plan._name()} cannot be inspected: {_quote(str(p))}: {err.strerror}; "
                        f"choose a location you can read") from None


def _special(path: Path) -> str | None:
    """``"the current directory"`` etc. for the dirs an output must never take over."""
    if path == Path(path.anchor):
        return "the filesystem root"
    with contextlib.suppress(OSError, RuntimeError, KeyError):
        if path == Path.cwd().resolve():
            return "the current directory"
    with contextlib.suppress(OSError, RuntimeError, KeyError):
        if path == Path.home().resolve():
            return "your home directory"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "file"


def _quote(text: str, limit: int = 160) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters: an error line stays one short line."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _list(names: list[str], n: int = 3) -> str:
    shown = ", ".join(_quote(x, 60)[1:-1] for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")

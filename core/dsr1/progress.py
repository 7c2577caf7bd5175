"""Progress bars for long work (loading a large checkpoint, quantize, prune, bench), on a terminal only.

A bar is drawn with rich on stderr when all of these hold: the caller is not quiet (``--json``,
``--quiet``), stderr is a terminal, ``DSR1_PROGRESS`` is not ``0``, and rich is importable. Otherwise
every call here does nothing: rich is an optional extra, and its absence is not an error (the
command's output is the same, only without the bar). stdout is never written to, so a bar never
mixes with generated text or JSON.

Nested bars (a checkpoint loading inside ``dsr1 quantize``) share one live display: the innermost
:func:`progress` adds a task to the outer one instead of starting a second display.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: the live rich ``Progress`` while one is shown (nested bars add tasks to it).
_LIVE: Any = None


class Bar:
    """One task of a progress display; a bar that is not shown accepts the same calls and does nothing."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def advance(self, steps: float = 1, description: str | None = None) -> None:
        if self._progress is not None:
            fields = {} if description is None else {"description": description}
            self._progress.update(self._task, advance=steps, **fields)

    def total(self, total: float | None) -> None:
        """Set (or correct) the number of steps once it is known."""
        if self._progress is not None:
            self._progress.update(self._task, total=total)


def enabled(quiet: bool = False, stream: Any = None) -> bool:
    """Whether a bar would be drawn (see the module docstring); no import of rich when it would not."""
    if quiet or os.environ.get("DSR1_PROGRESS", "1") == "0":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
    try:
        import rich.progress  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def advance(steps: float = 1, total: Callable[[], float] | None = None, description: str | None = None) -> None:
    """Advance the innermost bar shown by ``steps``; nothing when no bar is shown (the common case: a
    global check). Code deep in a long job (the checkpoint reader) calls this without knowing whether
    anyone draws a bar. ``total`` gives the bar's total the first time, where it has none yet."""
    if _LIVE is None or not _LIVE.task_ids:
        return
    task = _LIVE.task_ids[-1]
    fields: dict[str, Any] = {} if description is None else {"description": description}
    if total is not None and _LIVE.tasks[-1].total is None:
        fields["total"] = total()
    _LIVE.update(task, advance=steps, **fields)


@contextlib.contextmanager
def progress(description: str, total: float | None = None, quiet: bool = False) -> Iterator[Bar]:
    """A bar of ``total`` steps (``None``: unknown) named ``description``, with elapsed and remaining time."""
    global _LIVE
    if _LIVE is not None:  # inside another bar: one more task on the same display
        task = _LIVE.add_task(description, total=total)
        try:
            yield Bar(_LIVE, task)
        finally:
            _LIVE.remove_task(task)
        return
    if not enabled(quiet):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    live = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = live.add_task(description, total=total)
    _LIVE = live
    live.start()
    try:
        yield Bar(live, task)
    finally:
        live.stop()
        _LIVE = None

"""Progressive pruning: the ``dsr1 prune`` driver.

Strategies are ``dsr1.pruning`` plugins (:class:`dsr1.interfaces.Pruner`); this package drives
them: :mod:`.schedule` (settings and stages), :mod:`.recover` (fine-tuning between stages),
:mod:`.report` (report.json, curve.csv, curve.png) and :mod:`.runner` (the stage loop, atomic
stage dirs, Ctrl-C). What it measures comes from the family library (:mod:`dsr1.pruning.metrics`,
:mod:`dsr1.pruning.data`) and the benchmark library (:mod:`dsr1.benchmarks.pruning_speed`).

Strategies need nothing beyond :class:`~dsr1.interfaces.Pruner`, whose ``skipped`` dict (layer
name → why the last ``prune_`` left it alone) is copied into each stage of the report. One optional
extra is read when present (duck-typed): ``pruner.report_notes(device) -> list[str]`` (caveats the
report should carry, e.g. semi24's "dense with zeros on CPU"). Capabilities the runner reads:
``min_sparsity:X`` (progressive stages start there) and ``activation_aware`` / ``calibration``
(calibration text must be usable).

Only the modules a command uses are imported; importing this package imports nothing heavy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.tasks.prune.schedule import PruneSettings


def prune(settings: PruneSettings | dict[str, Any], command: str = "", quiet: bool = False) -> int:
    """Run a pruning job (``dsr1 prune`` in Python); returns the exit code (1: below the accuracy floor)."""
    from dsr1.tasks.prune.runner import PruneRun
    from dsr1.tasks.prune.schedule import PruneSettings

    if not isinstance(settings, PruneSettings):
        settings = PruneSettings.model_validate(settings)
    return PruneRun(settings, command, quiet=quiet).run()


__all__ = ["prune"]

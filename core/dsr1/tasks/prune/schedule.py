"""The settings of a pruning run and the schedule of stages they imply.

``schedule="once"`` has one stage, the target. ``schedule="progressive"`` walks from dense to
the target: ``stages`` when given (strictly increasing, each in (0, 1), none above the target;
the target is appended when it is not the last), else steps of 0.1 from 0.1 (from the
strategy's minimum sparsity, e.g. 0.5 for 2:4) up to the target. Every stage keeps at least
``min_params`` of the prunable parameters (default 0.3: "down to 30% of the parameters").

Sparsities are fractions of the prunable linear weights of the *dense* model; each stage
prunes the previous stage's model further (see :mod:`dsr1.tasks.prune.runner`).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dsr1.errors import Dsr1Error


class PruneSettings(BaseModel):
    """Everything ``dsr1 prune`` is told (unknown keys are refused; round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    target_sparsity: float
    strategy: str = "magnitude"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    output_dir: str
    schedule: Literal["once", "progressive"] = "once"
    stages: list[float] | None = None
    min_params: float = 0.3
    recover_steps: int = 0
    recover_lr: float = 1e-4
    calibration: str | None = None
    calibration_samples: int = 32
    calibration_len: int = 256
    eval_text: str | None = None
    eval_tokens: int = 8192
    eval_window: int = 256
    eval_sentences: int = 128
    accuracy_floor: float | None = None
    overwrite: bool = False
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    speed: bool = True
    speed_batch: int = 8
    speed_prompt: int = 64
    speed_new_tokens: int = 32
    speed_reps: int = 3
    seed: int = 0


def check_settings(s: PruneSettings) -> None:
    """One-line errors for settings that cannot work, before anything is loaded."""
    if not 0.0 <= s.target_sparsity < 1.0:
        raise Dsr1Error(f"--target-sparsity must be in [0, 1), got {s.target_sparsity}")
    if not 0.0 < s.min_params <= 1.0:
        raise Dsr1Error(f"--min-params must be in (0, 1], got {s.min_params}")
    if s.target_sparsity > 1.0 - s.min_params + 1e-9:
        raise Dsr1Error(
            f"--target-sparsity {s.target_sparsity} keeps {1 - s.target_sparsity:.0%} of the parameters, "
            f"below --min-params {s.min_params}; lower the target or pass a smaller --min-params"
        )
    if s.stages is not None and s.schedule != "progressive":
        raise Dsr1Error("--stages needs --schedule progressive")
    for name in ("recover_steps",):
        if getattr(s, name) < 0:
            raise Dsr1Error(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(s, name)}")
    for name in ("calibration_samples", "calibration_len", "eval_tokens", "eval_sentences", "speed_batch",
                 "speed_prompt", "speed_reps"):
        if getattr(s, name) < 1:
            raise Dsr1Error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(s, name)}")
    if s.eval_window < 2:
        raise Dsr1Error(f"--eval-window must be ≥ 2, got {s.eval_window}")
    if s.speed_new_tokens < 2:
        raise Dsr1Error(f"--speed-new-tokens must be ≥ 2, got {s.speed_new_tokens}")
    if s.recover_lr <= 0:
        raise Dsr1Error(f"--recover-lr must be > 0, got {s.recover_lr}")
    if s.threads is not None and s.threads < 1:
        raise Dsr1Error(f"--threads must be ≥ 1, got {s.threads}")


def parse_stages(text: str) -> list[float]:
    """``"0.1,0.2,0.3"`` → ``[0.1, 0.2, 0.3]`` (one-line error on anything else)."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise Dsr1Error(f"--stages must be comma-separated numbers, e.g. 0.1,0.3,0.5; got {text!r}") from None
    if not values:
        raise Dsr1Error(f"--stages must name at least one sparsity, got {text!r}")
    return values


def plan_stages(s: PruneSettings, min_sparsity: float = 0.0) -> list[float]:
    """The stage sparsities, in order (the last one is the target)."""
    target = s.target_sparsity
    if s.schedule == "once":
        stages = [target]
    elif s.stages is not None:
        stages = list(s.stages)
        bad = [v for v in stages if not 0.0 < v < 1.0]
        if bad:
            raise Dsr1Error(f"--stages must each be in (0, 1), got {bad[0]}")
        for a, b in itertools.pairwise(stages):
            if b <= a:
                raise Dsr1Error(f"--stages must be strictly increasing, got {a} then {b}")
        if stages[-1] > target + 1e-9:
            raise Dsr1Error(f"--stages goes to {stages[-1]}, past --target-sparsity {target}")
        if abs(stages[-1] - target) > 1e-9:
            stages.append(target)
    else:
        start = max(0.1, min_sparsity)
        n = round((target - start) / 0.1 + 1e-9)
        stages = [round(start + 0.1 * i, 6) for i in range(n + 1) if start + 0.1 * i < target - 1e-9]
        stages.append(target)
    low = [v for v in stages if 0.0 < v < min_sparsity - 1e-9]
    if low:
        raise Dsr1Error(
            f"strategy {s.strategy!r} prunes at least {min_sparsity:.0%} of a layer; stage {low[0]} is below that "
            f"(use stages ≥ {min_sparsity})"
        )
    names = [stage_name(v) for v in stages]
    if len(set(names)) != len(names):
        raise Dsr1Error(f"--stages {stages} name the same stage dir twice; keep stages at least 0.001 apart")
    return stages


def stage_name(sparsity: float) -> str:
    """``stage-0.50``, ``stage-0.125``: at least two decimals, at most three."""
    text = f"{sparsity:.3f}"
    text = text.removesuffix("0")
    return f"stage-{text}"


#: What ``--overwrite`` may delete from an output dir (everything ``dsr1 prune`` writes).
OWN_OUTPUTS = ("report.json", "curve.csv", "curve.png")


def is_own_output(path: str | Path) -> bool:
    """Whether ``path`` (or a bare name) is something ``dsr1 prune`` writes into its output dir.

    Only consulted for a dir that carries the marker of a previous ``dsr1 prune`` output
    (:mod:`dsr1.outputs`): a name that merely looks like ours in a dir without it is not replaced.
    """
    name = Path(path).name
    return name in OWN_OUTPUTS or name.startswith(("stage-", ".stage-", ".report.json.", ".curve."))

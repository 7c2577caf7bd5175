"""Tensor- and pipeline-parallel scaling on one multi-GPU machine, in one call (issue 17).

Runs ``dsr1 bench`` on one GPU (TP 1), then under ``torchrun`` with ``--tensor N`` ranks (TP N), and,
where this dsr1 has ``parallel.pipeline``, with 2 pipeline stages at the largest batch (PP 2); same
shape, random weights, dtype, prompts and lengths in every run. Writes one JSON: each run's command
and full report (per-rank peak memory and weight bytes under ``parallel``), and a summary per batch
size: decode and prefill tok/s, peak memory per GPU, and

* scaling efficiency at the largest batch = tok/s(TP N) / (N * tok/s(TP 1)), decode and prefill;
* speed-up at batch 1 = tok/s(TP N) / tok/s(TP 1) (latency-bound: what splitting the weights buys).

A run that fails is recorded with its last line and the others still run. The environment goes to
every run as it is (an ``NCCL_*`` setting of the caller, e.g. ``NCCL_NVLS_ENABLE=0``, is kept)::

    python -m dsr1.benchmarks.parallel --tensor 4 --output bench/results/parallel/qwen2-7b-tp4.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dsr1.benchmarks.common import write_report
from dsr1.errors import Dsr1Error


def has_pipeline() -> bool:
    """Whether this dsr1's config knows ``parallel.pipeline`` (pipeline stages)."""
    from dsr1.config import ParallelConfig

    return "pipeline" in ParallelConfig.model_fields


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_command(args: argparse.Namespace, batches: str, output: Path, config: Path | None,
                  ranks: int) -> list[str]:
    """``dsr1 bench`` of the shared settings; under ``torchrun`` with ``ranks`` above 1."""
    cmd = ["-m", "dsr1.cli", "bench", "--shape", args.shape, "--random-weights", "--device", args.device,
           "--dtype", args.dtype, "--batch-size", batches, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--reps", str(args.reps), "--json", "--quiet",
           "--output", str(output)]
    if config is not None:
        cmd += ["--config", str(config)]
    if ranks == 1:
        return [sys.executable, *cmd]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cmd]


def run_one(name: str, cmd: list[str], output: Path, timeout: float) -> dict[str, Any]:
    """One run: its command, and its report or the reason it has none."""
    print(f"== {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    entry: dict[str, Any] = {"command": shlex.join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        entry["error"] = f"timed out after {timeout:g} s"
        return entry
    if proc.returncode != 0 or not output.exists():
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()] or \
            proc.stderr.strip().splitlines() or ["(no output)"]
        entry["error"] = f"exit {proc.returncode}: {lines[-1][:500]}"
        return entry
    entry["report"] = json.loads(output.read_text())
    return entry


def per_batch(report: dict[str, Any] | None) -> dict[int, dict[str, float]]:
    """batch → decode/prefill tok/s and the peak memory of the busiest GPU, from one run's report."""
    if report is None:
        return {}
    out = {}
    ranks = report.get("parallel", {}).get("ranks")
    for row in report["results"]:
        b, d = row["batch_size"], row["dsr1"]
        peak = max(r["peak_mem_mb"][str(b)] for r in ranks) if ranks else d["peak_mem_mb"]
        out[b] = {"decode_tok_s": d["decode_tok_s"], "prefill_tok_s": d["prefill_tok_s"], "peak_mem_mb_per_gpu": peak}
    return out


def summary(runs: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    """Scaling efficiency at the largest batch and the speed-up at batch 1, from TP 1 and TP N."""
    one, many = per_batch(runs["tp1"].get("report")), per_batch(runs[f"tp{n}"].get("report"))
    rows = []
    for b in sorted(set(one) | set(many)):
        row: dict[str, Any] = {"batch_size": b, "tp1": one.get(b), f"tp{n}": many.get(b)}
        if b in one and b in many:
            row["decode_speedup"] = round(many[b]["decode_tok_s"] / one[b]["decode_tok_s"], 3)
            row["prefill_speedup"] = round(many[b]["prefill_tok_s"] / one[b]["prefill_tok_s"], 3)
        rows.append(row)
    out: dict[str, Any] = {"per_batch": rows}
    both = sorted(set(one) & set(many))
    if both:
        top = both[-1]
        out["largest_batch"] = top
        out["scaling_efficiency_decode"] = round(many[top]["decode_tok_s"] / (n * one[top]["decode_tok_s"]), 3)
        out["scaling_efficiency_prefill"] = round(many[top]["prefill_tok_s"] / (n * one[top]["prefill_tok_s"]), 3)
    if 1 in both:
        out["batch1_decode_speedup"] = round(many[1]["decode_tok_s"] / one[1]["decode_tok_s"], 3)
    pp = per_batch(runs.get("pp2", {}).get("report"))
    for b, figures in pp.items():
        out["pp2"] = {"batch_size": b, **figures}
        if b in one:
            out["pp2"]["decode_vs_tp1"] = round(figures["decode_tok_s"] / one[b]["decode_tok_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor", type=int, required=True, help="tensor-parallel ranks N (GPUs) to compare with one")
    p.add_argument("--shape", default="qwen2-7b", help="built-in shape (random weights)")
    p.add_argument("--batch-size", default="1,8,32,128", help="comma-separated batch sizes")
    p.add_argument("--pipeline-batch", type=int, default=128, help="the batch size of the PP 2 run")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--timeout-s", type=float, default=300.0, help="parallel.timeout_s of the launches, and each "
                                                                   "run's limit is 3 times it")
    p.add_argument("--no-pipeline", action="store_true", help="skip the PP 2 run")
    p.add_argument("--output", required=True, help="the combined JSON (each run's own JSON goes beside it)")
    args = p.parse_args(argv)
    n = args.tensor
    if n < 2:
        raise SystemExit(f"--tensor must be 2 or more (the ranks compared with one GPU), got {n}")
    out = Path(args.output)
    runs_dir = out.with_suffix("")  # each run's report: <output without .json>/<run>.json
    runs_dir.mkdir(parents=True, exist_ok=True)
    limit = 3 * args.timeout_s
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def config(tensor: int, pipeline: int) -> Path:
            path = Path(tmp) / f"tp{tensor}-pp{pipeline}.yaml"
            text = f"parallel:\n  tensor: {tensor}\n  timeout_s: {args.timeout_s:g}\n"
            path.write_text(text + (f"  pipeline: {pipeline}\n" if pipeline > 1 else ""))
            return path

        plan = [("tp1", args.batch_size, None, 1), (f"tp{n}", args.batch_size, config(n, 1), n)]
        if has_pipeline() and not args.no_pipeline:
            plan.append(("pp2", str(args.pipeline_batch), config(1, 2), 2))
        for name, batches, cfg, ranks in plan:
            report = runs_dir / f"{name}.json"
            report.unlink(missing_ok=True)
            runs[name] = run_one(name, bench_command(args, batches, report, cfg, ranks), report, limit)
            if "error" in runs[name]:
                print(f"== {name} failed: {runs[name]['error']}", file=sys.stderr, flush=True)
    combined = {
        "command": shlex.join(["python", "-m", "dsr1.benchmarks.parallel", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensor": n, "pipeline_run": "pp2" in runs,
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
        "summary": summary(runs, n),
        "runs": runs,
    }
    write_report(combined, str(out))
    print(json.dumps(combined["summary"], indent=2))
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except Dsr1Error as err:
        print(f"dsr1.benchmarks.parallel: {err}", file=sys.stderr)
        sys.exit(2)

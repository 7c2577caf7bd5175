"""``dsr1 bench precision``: decode speed with quant unset against explicit precision policies, in one process.

``quant: fp32`` (what the hardware section's ``precision: fp32`` selects) keeps the weights the
model would have with quant unset, so it must keep the device's fast path too (issue 20: the CPU
panel/oneDNN layouts were once skipped whenever any quant policy was set). This form builds one
model per setting from the same random weights (``dsr1 bench --shape``: each tensor from a
generator seeded by its name), in this one process, and times them interleaved: per batch size a
warm-up ``generate`` each, then ``--reps`` rounds in which every model runs a 1-token and an
N-token ``generate`` in turn, so load drifts hit all settings alike. Rates and their validity:
:mod:`dsr1.benchmarks.rates`. ``ratio_vs_unset`` = the setting's rate / the unset model's rate
(1.0 = as fast), from the medians; ``best_decode_tok_s`` is the same rate from the fastest 1-token
and N-token runs (on a shared machine other processes only ever add time, so the minimum is the
steadier estimate there); ``layers`` counts each setting's linear layer classes after the run (what the
device's kernel and the layout switch made of them).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.rates import rates
from dsr1.errors import Dsr1Error
from dsr1.progress import progress

#: the setting every other is compared with.
UNSET = "unset"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("precision",
                       help="decode tok/s with quant unset vs explicit policies (same weights, one process)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny-125m", help="a built-in model shape (random weights)")
    p.add_argument("--quant", default="fp32",
                   help="comma-separated quant settings compared with quant unset (e.g. fp32,bf16)")
    p.add_argument("--batch-size", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per generate (at least 2)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per batch size (medians reported)")
    p.add_argument("--device", default="cpu", help="device plugin")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    parts = ["dsr1", "bench", "precision", "--shape", args.shape, "--quant", args.quant, "--batch-size",
             args.batch_size, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
             "--reps", str(args.reps), "--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.output:
        parts += ["--output", args.output]
    return shlex.join(parts + (["--json"] if args.json else []))


def linear_kinds(model: Any) -> dict[str, int]:
    """How many of the model's linear layers are of each class (``Linear``, ``OnednnLinear``, ``PanelLinear``...)."""
    return dict(Counter(type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")))


def run(args: argparse.Namespace) -> int:
    batches = common.int_list(args.batch_size, "--batch-size")
    settings = [UNSET, *common.name_list(args.quant, "--quant")]
    if UNSET in settings[1:]:
        raise Dsr1Error(f"--quant lists {UNSET!r}, which is always measured; list only policies, e.g. fp32")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.reps < 1:
        raise Dsr1Error("--new-tokens ≥ 2, --prompt-len ≥ 1 and --reps ≥ 1 are required")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = args.json or args.quiet
    models: dict[str, Any] = {}
    with progress("building models", total=len(settings), quiet=quiet) as bar:
        for name in settings:
            overrides = {"device": args.device} | ({} if name == UNSET else {"quant": name})
            models[name] = common.random_model(args.shape, None, overrides)
            bar.advance()
    p, n = args.prompt_len, args.new_tokens
    results = []
    steps = len(batches) * (args.reps + 1) * len(settings)
    with progress("timing generate", total=steps, quiet=quiet) as bar:
        for b in batches:
            row = _one_batch(models, b, p, n, args.reps, bar)
            results.append(row)
    report = {
        "command": command_line(args),
        **common.environment(args.device, args.threads),
        "settings": {"shape": args.shape, "quant": settings, "batch_sizes": batches, "prompt_len": p,
                     "new_tokens": n, "reps": args.reps, "device": args.device},
        "pipelines": {name: m.pipeline.describe() for name, m in models.items()},
        "layers": {name: linear_kinds(m) for name, m in models.items()},
        "results": results,
    }
    text = common.write_report(report, args.output)
    if args.json:
        print(text)
        return 0
    for row in results:
        for name in settings:
            got = row[name]
            r = row["ratio_vs_unset"].get(name)
            ratio = "" if r is None else f"  {r['decode_tok_s']:.3f}x of unset (best: {r['best_decode_tok_s']:.3f}x)"
            print(f"batch {row['batch_size']:>3} {name:>6}: decode {got['decode_tok_s']:8.1f} tok/s (best "
                  f"{got['best_decode_tok_s']:.1f})  prefill {got['prefill_tok_s']:8.1f} tok/s{ratio}")
    for name, kinds in report["layers"].items():
        print(f"{name}: linear layers {', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))}")
    return 0


def _one_batch(models: dict[str, Any], b: int, p: int, n: int, reps: int, bar: Any) -> dict[str, Any]:
    """One batch size: a warm-up per model, then ``reps`` interleaved rounds; rates per setting."""
    import torch

    g = torch.Generator().manual_seed(1234)
    vocab = int(next(iter(models.values())).config["vocab_size"])
    ids = torch.randint(min(100, vocab - 1), vocab, (b, p), generator=g)
    mask = torch.ones_like(ids)

    def timed(model: Any, new: int) -> float:
        started = time.perf_counter()
        out = model.generate(ids, mask, max_new_tokens=new, ignore_eos=True)
        elapsed = time.perf_counter() - started
        if tuple(out.shape) != (b, p + new):
            raise Dsr1Error(f"generate returned {tuple(out.shape)}, expected {(b, p + new)}")
        return elapsed

    for model in models.values():  # warm-up: the first generate picks the layout (the device's kernel)
        timed(model, n)
        bar.advance()
    t1: dict[str, list[float]] = {name: [] for name in models}
    tn: dict[str, list[float]] = {name: [] for name in models}
    busy = common.cpu_busy()
    for _ in range(reps):
        for name, model in models.items():
            t1[name].append(timed(model, 1))
            tn[name].append(timed(model, n))
            bar.advance()
    row: dict[str, Any] = {"batch_size": b, "other_processes_cpu_pct": common.others_busy(busy, common.cpu_busy())}
    for name in models:
        what = f"bench precision {name} batch {b}"
        best = rates(what, b, p, n, [min(t1[name])], [min(tn[name])])
        row[name] = {**rates(what, b, p, n, t1[name], tn[name]), "best_decode_tok_s": best["decode_tok_s"],
                     "times_1": t1[name], "times_n": tn[name]}
    base = row[UNSET]
    row["ratio_vs_unset"] = {
        name: {k: round(row[name][k] / base[k], 3)
               for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s", "best_decode_tok_s")}
        for name in models if name != UNSET
    }
    others = row["other_processes_cpu_pct"]
    if others is not None and others > 10:
        print(f"dsr1 bench precision: warning: other processes kept {others:.0f}% of the CPUs busy at batch {b}; "
              "its figures are not trustworthy", file=sys.stderr, flush=True)
    return row

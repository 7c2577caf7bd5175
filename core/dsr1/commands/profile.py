"""``dsr1 profile``: where a decode step's time goes, operator by operator.

Loads the model with ``monitor: profiler`` (every step sampled unless ``--every`` says otherwise)
and, by default, ``graph: eager``: captured graphs and compiled steps do not call the module
hooks that time the operators. For each batch size it generates ``--steps`` new tokens from
random prompts of ``--prompt-len`` tokens (after one short warm-up generate, not counted) and
prints each operator's median time per decode step, its share of the step's median and, for the
operators that read weights, the achieved bandwidth (weight bytes / time). Medians, because a
sampled step times one decoder layer and multiplies it by the layer count: a one-off stall in
that layer (a page fault, a first call) comes out tens of times larger, and a mean over a few
dozen steps showed shares summing past 100 %. The JSON keeps the means and variances too. It
writes to ``--out``:

* ``profile.json``: the table, with the arguments, machine and versions;
* ``profile.png``: a bar chart of the operators' time per step, one bar per batch size
  (matplotlib, the ``plot`` extra: ``pip install 'dsr1[plot]'``);
* ``trace-b<N>.json``: the sampled steps of batch size N as a Chrome trace
  (``chrome://tracing`` or https://ui.perfetto.dev).

Files there that ``dsr1 profile`` did not write are never replaced; its own are replaced whole.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from dsr1.errors import Dsr1Error
from dsr1.output_files import replace_atomic

#: the PNG text chunk (``Software``) that marks a chart as this command's.
CHART_MARK = "dsr1 profile"
#: what ``profile.json`` says it is (its ``writer`` key).
REPORT_WRITER = "dsr1 profile"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="time each operator of a decode step; write a chart and a trace",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dsr1-tiny", help="model name or HF-format directory")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON)")
    p.add_argument("--batch-size", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per random prompt")
    p.add_argument("--steps", type=int, default=32, help="decode steps per batch size")
    p.add_argument("--every", type=int, default=1, help="time the operators of every Nth step")
    p.add_argument("--layers", default="1",
                   help="decoder layers timed per sampled step, in turn, scaled to the stack (an integer, or 'all': "
                        "every layer, with the hooks' own cost in the figures)")
    p.add_argument("--graph", default="eager",
                   help="graph plugin; operators are timed in eager forwards only (a captured or compiled step "
                        "gives its step time alone)")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    p.add_argument("--device", help="device plugin (cpu, cuda); default from config")
    p.add_argument("--out", default="dsr1-profile", help="output directory (profile.json, profile.png, traces)")
    p.add_argument("--top", type=int, default=10, help="operators printed per batch size")
    p.add_argument("--quiet", action="store_true", help="no progress bar while the model loads")
    p.set_defaults(func=run)


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise Dsr1Error(f"--batch-size must be comma-separated integers >= 1 (e.g. 1,8), got {text!r}")
    return sorted(set(batches))


def check_args(args: argparse.Namespace) -> list[int]:
    """Every argument checked before the model loads; returns the batch sizes."""
    batches = parse_batches(args.batch_size)
    for flag, value in (("--prompt-len", args.prompt_len), ("--steps", args.steps), ("--every", args.every),
                        ("--top", args.top)):
        if value < 1:
            raise Dsr1Error(f"{flag} must be an integer >= 1, got {value}")
    if args.layers != "all" and not (args.layers.isdigit() and int(args.layers) >= 1):
        raise Dsr1Error(f"--layers must be an integer >= 1 or 'all', got {args.layers!r}")
    if args.steps < args.every:
        raise Dsr1Error(f"--steps {args.steps} samples no step at --every {args.every}; pass --steps >= --every")
    return batches


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise Dsr1Error("dsr1 profile draws its chart with matplotlib, which is not installed: "
                        "pip install 'dsr1[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display; set here, when the chart is wanted, not at import
    import matplotlib.pyplot as plt

    return plt


# --- what may be written -----------------------------------------------------------------------


def _own_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("writer") == REPORT_WRITER


def _own_chart(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)  # matplotlib writes its text chunks before the image data
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and CHART_MARK.encode() in head


def _own_trace(path: Path) -> bool:
    from dsr1.monitor.profiler import is_own_trace

    return is_own_trace(path)


def plan_files(out: Path, batches: list[int]) -> dict[str, Path]:
    """The files to write under ``out``; refuses (one line) a file in the way that this command did not write."""
    if out.exists() and not out.is_dir():
        raise Dsr1Error(f"--out {out} is a file; pass a directory (it is created if missing)")
    files = {"report": out / "profile.json", "chart": out / "profile.png",
             **{f"trace{b}": out / f"trace-b{b}.json" for b in batches}}
    for key, path in files.items():
        if not (path.exists() or path.is_symlink()):
            continue
        own = {"report": _own_report, "chart": _own_chart}.get(key, _own_trace)
        if path.is_symlink() or not path.is_file() or not own(path):
            raise Dsr1Error(f"{path} exists and was not written by dsr1 profile; pass another --out or move it away")
    return files


# --- measuring ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def decode_rows(monitor: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The decode steps the monitor saw, over every context bucket: the step's figures and one row per
    operator (median seconds per step over the kept sampled steps, share of the sampled step's median,
    GB/s for the weight-reading ones; mean and variance beside them)."""
    from dsr1.monitor.profiler import WEIGHT_BOUND, RunningStat

    monitor.operator_stats()  # reads the pending marks
    merged: dict[str, RunningStat] = {}
    for (phase, _, _), ops in monitor.op_stats.items():
        if phase != "decode":
            continue
        for op, s in ops.items():
            merged.setdefault(op, RunningStat()).merge(s)
    every = RunningStat()
    for (phase, _, _), s in monitor.step_stats.items():
        if phase == "decode":
            every.merge(s)
    sampled = merged.pop("step", RunningStat())
    kept = [x for x in monitor.samples if x["phase"] == "decode"]
    step_median = _median([x["seconds"] for x in kept])
    step = {"steps": every.count, "step_mean_s": every.mean, "sampled_steps": sampled.count,
            "sampled_step_mean_s": sampled.mean, "sampled_step_median_s": step_median}
    rows = []
    for op, s in merged.items():
        median = _median([x["operators"].get(op, 0.0) for x in kept])
        nbytes = monitor.weight_bytes.get(op) if op in WEIGHT_BOUND else None
        rows.append({"operator": op, "median_s": median, "mean_s": s.mean, "variance_s": s.variance,
                     "share": median / step_median if step_median else None,
                     "weight_bytes": nbytes, "gb_per_s": nbytes / median / 1e9 if nbytes and median > 0 else None})
    rows.sort(key=lambda r: -r["median_s"])
    return step, rows


def profile_batch(model: Any, batch: int, prompt_len: int, steps: int) -> dict[str, Any]:
    import torch

    monitor = model.pipeline.monitor
    vocab = int(model.args.vocab_size)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(model.device)  # (B, T0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, ignore_eos=True, pad_token_id=0)  # warm-up, not counted
        monitor.clear()
        model.generate(ids, max_new_tokens=steps + 1, ignore_eos=True, pad_token_id=0)  # prefill + steps decodes
    step, rows = decode_rows(monitor)
    return {"batch_size": batch, **step, "operators": rows}


def _print_table(result: dict[str, Any], top: int) -> None:
    print(f"batch {result['batch_size']}: {result['sampled_steps']} sampled decode steps, median "
          f"{result['sampled_step_median_s'] * 1e3:.3f} ms per sampled step "
          f"(mean {result['step_mean_s'] * 1e3:.3f} ms over all {result['steps']})")
    print(f"  {'operator':<10} {'share':>7} {'ms/step':>9} {'GB/s':>8}")
    for r in result["operators"][:top]:
        share = f"{r['share'] * 100:6.1f}%" if r["share"] is not None else "      -"
        bw = f"{r['gb_per_s']:8.2f}" if r["gb_per_s"] is not None else "       -"
        print(f"  {r['operator']:<10} {share} {r['median_s'] * 1e3:9.3f} {bw}")
    shares = [r["share"] for r in result["operators"] if r["share"] is not None]
    if shares:
        print(f"  the operators' medians add up to {sum(shares) * 100:.1f}% of the step's")


def draw_chart(plt: Any, results: list[dict[str, Any]], path: Path, title: str) -> None:
    ops = sorted({r["operator"] for res in results for r in res["operators"]},
                 key=lambda op: -max(r["median_s"] for res in results for r in res["operators"] if r["operator"] == op))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(ops)), 4.0))
    width = 0.8 / max(1, len(results))
    for i, res in enumerate(results):
        by_op = {r["operator"]: r["median_s"] * 1e3 for r in res["operators"]}
        xs = [j + i * width for j in range(len(ops))]
        ax.bar(xs, [by_op.get(op, 0.0) for op in ops], width, label=f"batch {res['batch_size']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops)
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": CHART_MARK}))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    batches = check_args(args)
    plt = _require_matplotlib()
    out = Path(args.out)
    files = plan_files(out, batches)
    import torch

    from dsr1.auto import AutoModel
    from dsr1.progress import progress

    layers = args.layers if args.layers == "all" else int(args.layers)
    monitor = {"name": "profiler", "options": {"every": args.every, "keep": args.steps + 2, "layers": layers}}
    with progress(f"loading {args.model}", quiet=args.quiet):
        model = AutoModel.from_pretrained(args.model, args.config, dtype=args.dtype, monitor=monitor,
                                          graph=args.graph, device=args.device)
    if not hasattr(model, "generate"):
        raise Dsr1Error(f"model {args.model!r} ({model.config.get('model_type')}) is an encoder; dsr1 profile "
                        "times decode steps of a causal LM")
    context = model.context_length
    if args.prompt_len + args.steps + 1 > context:  # checked here, not by generate (whose words are its own)
        raise Dsr1Error(f"--prompt-len {args.prompt_len} + --steps {args.steps} + 1 (the prefill's token) exceeds the "
                        f"model's context of {context} tokens; pass --steps at most "
                        f"{max(context - args.prompt_len - 1, 0)}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for b in batches:
        result = profile_batch(model, b, args.prompt_len, args.steps)
        results.append(result)
        _print_table(result, args.top)
        model.pipeline.monitor.write_trace(files[f"trace{b}"])
    report = {
        "writer": REPORT_WRITER, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "model": str(args.model), "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "graph": args.graph, "prompt_len": args.prompt_len, "steps": args.steps, "every": args.every,
        "layers": layers,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "results": results,
    }
    replace_atomic(files["report"], lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
    draw_chart(plt, results, files["chart"], f"{args.model} · {report['device']} · {report['dtype']}")
    print(f"wrote {files['report']}, {files['chart']} and {len(batches)} trace(s) under {out}")
    return 0

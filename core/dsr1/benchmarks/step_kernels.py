"""The kernels of one captured decode step, with their device time: where a batch-1 step's time goes beyond its
weight reads (issue 16).

    python -m dsr1.benchmarks.step_kernels --shape qwen2-7b --quant int8 --output OUT.json

The model runs compiled + captured (graph ``cudagraph`` with ``compile``), as the batch-1 figures do. Two
``generate`` calls are profiled with ``torch.profiler`` (CUDA activity), one of 1 token and one of
``1 + --steps`` tokens; their difference divided by ``--steps`` is one decode step, prefill and set-up
cancelled out. For each kernel name: calls and microseconds per step, and a kind (weight GEMV or matmul,
attention, inductor's fused elementwise and reduction kernels, copies). The step's wall time comes from the
same two calls timed without the profiler; what the kernels do not cover is idle device time between them
(launch and ramp-up inside the graph).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from dsr1.benchmarks.common import write_report
from dsr1.benchmarks.cuda_timing import require_cuda, sync_time
from dsr1.benchmarks.shapes import SHAPES

#: kind → substrings of kernel names (lower case), tried in this order; the first match names the kind.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # first: flash's ``splitkv`` is not a GEMM's; ``_decode_kernel`` is the SDK's CUDA decode attention
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn", "_decode_kernel")),
    ("weights", ("_gemv_kernel", "_dot_kernel", "gemv", "gemm", "nvjet", "xmma", "cutlass", "tinygemm",
                 "_weight_int4", "scaled_mm")),
    ("fused (inductor)", ("triton_",)),  # before copy: inductor names kernels by their ops (``_to_copy``)
    ("copy", ("memcpy", "memset", "copy")),
)


def kind(name: str) -> str:
    """The kind of a kernel from its name (:data:`KINDS`); ``other`` when nothing matches."""
    low = name.lower()
    for label, needles in KINDS:
        if any(n in low for n in needles):
            return label
    return "other"


def per_step(short: Iterable[tuple[str, float]], long: Iterable[tuple[str, float]], steps: int
             ) -> list[dict[str, Any]]:
    """Kernel ``(name, microseconds)`` events of the short and the long call → per kernel name, calls and
    microseconds per decode step (long − short, over ``steps``), the largest first; names whose count does
    not grow with the steps (prefill, set-up) drop out."""
    def totals(events: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for name, us in events:
            out[name][0] += 1
            out[name][1] += us
        return out

    a, b = totals(short), totals(long)
    rows = []
    for name in b:
        calls = (b[name][0] - a.get(name, [0, 0.0])[0]) / steps
        us = (b[name][1] - a.get(name, [0, 0.0])[1]) / steps
        if calls > 0:
            rows.append({"kernel": name, "kind": kind(name), "calls_per_step": round(calls, 2),
                         "us_per_step": round(us, 2)})
    return sorted(rows, key=lambda r: -r["us_per_step"])


def summarize(rows: list[dict[str, Any]], step_us: float) -> dict[str, Any]:
    """Microseconds per step by kind, their sum, and the idle rest of the measured step."""
    by_kind: dict[str, float] = defaultdict(float)
    calls = 0.0
    for r in rows:
        by_kind[r["kind"]] += r["us_per_step"]
        calls += r["calls_per_step"]
    busy = sum(by_kind.values())
    return {"step_us": round(step_us, 1), "kernel_us": round(busy, 1), "idle_us": round(step_us - busy, 1),
            "kernels_per_step": round(calls, 1),
            "by_kind_us": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def _profiled(model: Any, ids: Any, tokens: int) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=tokens, ignore_eos=True)
        sync_time()
    return [(e.name, e.device_time_total) for e in prof.events()
            if e.device_type.name == "CUDA" and e.device_time_total > 0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.step_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b", choices=sorted(SHAPES))
    p.add_argument("--quant", default=None, help="a quant policy name or JSON {\"name\": ..., \"options\": {...}}")
    p.add_argument("--attention", default=None, help="the attention plugin, a name or JSON (default: the config's)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps the long call adds to the short one")
    p.add_argument("--top", type=int, default=25, help="kernels printed (the JSON has all)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.steps < 1 or args.prompt_len < 1:
        p.error(f"--steps and --prompt-len must be at least 1, got {args.steps} and {args.prompt_len}")
    require_cuda(p.prog)
    import torch

    from dsr1.benchmarks.decode_modes import build
    from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass

    model, pipeline = build(args.shape, args.quant, attention=args.attention)
    model.runtime.steps = CudaGraphPass(CudaGraphOptions(compile=True)).apply(model, pipeline.device)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(100, int(model.args.vocab_size), (1, args.prompt_len), generator=g).cuda()
    model.generate(ids, max_new_tokens=1 + args.steps, ignore_eos=True)  # compile, capture, tune
    walls = []
    for _ in range(3):  # the step's wall time: the same two calls, unprofiled, best of three
        t0 = sync_time()
        model.generate(ids, max_new_tokens=1, ignore_eos=True)
        t1 = sync_time()
        model.generate(ids, max_new_tokens=1 + args.steps, ignore_eos=True)
        t2 = sync_time()
        walls.append(((t2 - t1) - (t1 - t0)) / args.steps * 1e6)
    rows = per_step(_profiled(model, ids, 1), _profiled(model, ids, 1 + args.steps), args.steps)
    report = {
        "command": " ".join(["python", "-m", "dsr1.benchmarks.step_kernels", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape, "quant": args.quant,
        "attention": args.attention,
        "summary": summarize(rows, min(walls)), "kernels": rows,
    }
    write_report(report, args.output)
    s = report["summary"]
    print(json.dumps(s))
    for r in rows[:args.top]:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kind']:<17} {r['kernel'][:90]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

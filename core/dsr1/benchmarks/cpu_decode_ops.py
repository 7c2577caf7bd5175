"""Issue 16: where a CPU decode step's time goes, operator by operator, under ``torch.profiler``.

    python -m dsr1.benchmarks.cpu_decode_ops --work-dir /tmp/lcppw --quant w8a8 --graph compile \\
        --cpu-decode kernel,sdpa --output bench/results/cpu-llamacpp/decode-ops-w8a8-compile.json

On the ``tiny-125m`` Llama shape (random weights under ``--work-dir``, as :mod:`dsr1.benchmarks.llamacpp`
writes them), batch 1, one ``--prompt-len`` prompt: after two warm-up generates, one generate of
``--steps`` new tokens runs under the profiler. For each of the sdpa plugin's ``cpu_decode`` settings it
reports the operators with the most CPU time (their calls and mean µs per call, self time), and dynamo's
guard check (``TorchDynamo Cache Lookup``) when the step is compiled. A profiler adds its own cost per
operator: compare the settings with each other, not with an unprofiled tok/s.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.llamacpp import PAIRS, SHAPE
from dsr1.benchmarks.tiered import write_checkpoint
from dsr1.errors import Dsr1Error


def profile_ops(model: Any, prompt: Any, steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators by self CPU time over one generate of ``steps`` tokens, plus dynamo's guard check."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> Any:
        return model.generate(prompt, max_new_tokens=steps, ignore_eos=True)

    run()
    run()  # compiles (graph compile) and loads every kernel before the measured generate
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    keep = events[:top] + [e for e in events[top:] if e.key == "TorchDynamo Cache Lookup"]
    return [{"op": e.key, "calls": e.count, "self_us_per_call": round(e.self_cpu_time_total / e.count, 2),
             "total_us_per_call": round(e.cpu_time_total / e.count, 2)} for e in keep]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.cpu_decode_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="where the checkpoint is written (reused)")
    p.add_argument("--quant", default="w8a8", choices=list(PAIRS))
    p.add_argument("--graph", choices=("eager", "compile"), default="compile")
    p.add_argument("--cpu-decode", default="kernel,sdpa", help="the sdpa plugin's cpu_decode settings to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--output")
    args = p.parse_args(argv)
    modes = [m for m in args.cpu_decode.split(",") if m]
    if not modes or any(m not in ("kernel", "sdpa") for m in modes):
        raise Dsr1Error(f"--cpu-decode takes kernel and/or sdpa, got {args.cpu_decode!r}")
    import torch

    from dsr1.auto import AutoModel

    torch.set_num_threads(args.threads)
    model_dir, hf, _ = write_checkpoint(SHAPE, Path(args.work_dir).expanduser().resolve(), "cpu")
    prompt = torch.randint(100, int(hf["vocab_size"]), (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {
        "command": "python -m dsr1.benchmarks.cpu_decode_ops " + shlex.join(sys.argv[1:] if argv is None else argv),
        **common.environment("cpu", args.threads), "shape": SHAPE,
        "settings": {"quant": args.quant, "graph": args.graph, "prompt_len": args.prompt_len, "steps": args.steps},
        "results": {},
    }
    for mode in modes:
        config = {**PAIRS[args.quant][0], "attention": {"name": "sdpa", "options": {"cpu_decode": mode}}}
        model = AutoModel.from_pretrained(model_dir, device="cpu", graph=args.graph, **config)
        report["results"][mode] = rows = profile_ops(model, prompt, args.steps, args.top)
        print(f"cpu_decode: {mode}")
        for r in rows:
            print(f"  {r['op'][:55]:<55} {r['calls']:>6} calls {r['self_us_per_call']:>9.2f} us self")
    print(common.write_report(report, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 16: what ``monitor: profiler`` costs at a sampling rate, against ``monitor: timing``, on one
model in one process, rounds alternating.

    python -m dsr1.benchmarks.profiler_overhead --shape qwen2-7b --work-dir /tmp/w --batch-size 1,16 \\
        --every 100 --new-tokens 64 --rounds 3 --output OUT.json

It writes (or reuses) a random bf16 checkpoint of ``--shape`` under ``--work-dir`` (the one
``dsr1 profile --model`` can then read), loads it once with graph ``eager`` (the profiler times
operators in eager forwards) and, for each batch size, times decode with the pipeline's monitor
set to ``timing`` and to ``profiler`` (``every`` N steps sampled) in alternating rounds. Decode
tok/s = B·(N−1) / (t(N) − t(1)) over medians (:func:`~dsr1.benchmarks.cuda_timing.decode_rate`);
the overhead is 1 − profiler / timing of the medians over rounds. Each row also gives the
``interleaved`` estimate (:func:`interleaved`): sampled and plain steps side by side in the same
generate calls, which a process whose eager step drifts cannot blur.
"""
from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.cuda_timing import decode_rate
from dsr1.benchmarks.tiered import write_checkpoint
from dsr1.errors import Dsr1Error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.profiler_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b")
    p.add_argument("--work-dir", required=True, help="where the checkpoint is written (and reused)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where there is one")
    p.add_argument("--batch-size", default="1,16")
    p.add_argument("--every", type=int, default=100, help="the profiler samples every Nth step")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="pairs of 1-token and N-token generates per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per monitor, alternating")
    p.add_argument("--output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from dsr1.auto import AutoModel
    from dsr1.monitor.profiler import ProfilerMonitor, ProfilerOptions
    from dsr1.monitor.timing import TimingMonitor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.every < 1 or args.rounds < 1 or args.new_tokens < 2:
        raise Dsr1Error("--every ≥ 1, --rounds ≥ 1 and --new-tokens ≥ 2 are required")
    batches = common.int_list(args.batch_size, "--batch-size")
    model_dir, hf, _ = write_checkpoint(args.shape, Path(args.work_dir).expanduser().resolve(), device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(model_dir, device=device, graph="eager", dtype=dtype)
    monitors = {"timing": TimingMonitor(), "profiler": ProfilerMonitor(ProfilerOptions(every=args.every))}
    vocab = int(hf["vocab_size"])

    def generate(ids: Any, n: int) -> Any:
        return model.generate(ids, max_new_tokens=n, ignore_eos=True)

    rows = []
    report: dict[str, Any] = {
        "command": "python -m dsr1.benchmarks.profiler_overhead " + shlex.join(sys.argv[1:] if argv is None else argv),
        **common.environment(device), "device": device, "shape": args.shape, "every": args.every,
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
                     "rounds": args.rounds, "graph": "eager"},
        "results": rows,
    }
    for b in batches:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(100, vocab, (b, args.prompt_len), generator=g).to(device)
        rates: dict[str, list[float]] = {name: [] for name in monitors}
        for name, monitor in monitors.items():  # warm-up: kernels, the profiler's first sampled step
            model.pipeline.monitor = monitor
            generate(ids, args.new_tokens)
        for r in range(args.rounds):
            order = list(monitors) if r % 2 == 0 else list(reversed(monitors))
            for name in order:
                model.pipeline.monitor = monitors[name]
                got = decode_rate(f"{name} batch {b}", functools.partial(generate, ids), b, args.prompt_len,
                                  args.new_tokens, args.reps)
                rates[name].append(got["decode_tok_s"])
        timing, profiled = statistics.median(rates["timing"]), statistics.median(rates["profiler"])
        row = {"batch_size": b, "timing_decode_tok_s": round(timing, 2), "profiler_decode_tok_s": round(profiled, 2),
               "rounds": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
               "overhead": round(1 - profiled / timing, 4),
               "sampled_steps": max((s.count for s in monitors["profiler"].operator_stats() if s.operator != "step"),
                                    default=0)}
        row["interleaved"] = interleaved(model, generate, ids, args.new_tokens, args.reps, args.every)
        rows.append(row)
        print(f"batch {b:>3}: timing {timing:.1f} tok/s, profiler every {args.every} {profiled:.1f} tok/s, "
              f"overhead {row['overhead']:.2%}; interleaved: a sampled step costs "
              f"{row['interleaved']['extra_ms']:.3f} ms more than a plain one "
              f"({row['interleaved']['unsampled_step_ms']:.3f} ms), {row['interleaved']['overhead_at_every']:.2%} "
              f"at every {args.every}", flush=True)
        common.write_report(report, args.output)
    model.pipeline.monitor = monitors["timing"]
    return 0


def interleaved(model: Any, generate: Any, ids: Any, new_tokens: int, reps: int, every: int) -> dict[str, float]:
    """What a sampled step costs, from steps interleaved in the same generate calls: the profiler
    samples every other step, and its own per-bucket statistics give the mean of the sampled steps
    and of all of them (so of the others). Decode buckets only, weighted by their step counts.
    Alternating rounds of whole generates (the figure above) compare stretches of time; on a
    launch-bound eager step that drifts within a process, this one compares neighbouring steps.
    The loss at one sampled step in ``every``: extra / (every · plain + extra)."""
    from dsr1.monitor.profiler import ProfilerMonitor, ProfilerOptions

    monitor = ProfilerMonitor(ProfilerOptions(every=2))
    model.pipeline.monitor = monitor
    for _ in range(reps + 1):
        generate(ids, new_tokens)
    sampled_s = sampled_n = all_s = all_n = 0.0
    for key, stat in monitor.step_stats.items():
        sampled = monitor.op_stats.get(key, {}).get("step")
        if key[0] != "decode" or sampled is None or stat.count <= sampled.count:
            continue
        sampled_s += sampled.mean * sampled.count
        sampled_n += sampled.count
        all_s += stat.mean * stat.count
        all_n += stat.count
    if not sampled_n:
        raise Dsr1Error("the interleaved run sampled no decode step; pass --new-tokens ≥ 4")
    sampled = sampled_s / sampled_n
    plain = (all_s - sampled_s) / (all_n - sampled_n)
    extra = sampled - plain
    return {"sampled_step_ms": round(sampled * 1e3, 4), "unsampled_step_ms": round(plain * 1e3, 4),
            "extra_ms": round(extra * 1e3, 4), "steps": int(all_n),
            "overhead_at_every": round(extra / (every * plain + extra), 5)}


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode modes on one set of weights, in one process: ordinary eager step, CUDA graph of the
static step, the static step compiled by torch.compile then captured (issue 5), and graph
``adaptive`` (issue 16), which measures those plans per bucket and keeps the fastest: each row
reports what it chose and its rate against the best fixed mode of the row.

    python -m dsr1.benchmarks.decode_modes --shape qwen2-7b --batch-size 1,8,32,128 --output OUT.json

For every batch size: greedy tokens of each mode compared with the eager step's (identical or
the first position that differs), and decode tok/s (medians of --reps; decode = B·(N−1) /
(t(N) − t(1)): :func:`~dsr1.benchmarks.cuda_timing.decode_rate`), beside the batch-1 floor
(weight bytes / streaming bandwidth measured here). The official figures against transformers come from ``dsr1 bench --compare hf``; this module
is the same-weights identity check and the mode-against-mode ratio. CUDA only.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import time
from typing import Any

from dsr1.benchmarks.common import bandwidth_gbs, write_report
from dsr1.benchmarks.cuda_timing import decode_rate, require_cuda, sync_time
from dsr1.benchmarks.shapes import SHAPES, build_random, random_weights
from dsr1.benchmarks.throughput import active_bytes

MODES: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "cudagraph": {"compile": False},
    "cudagraph+compile": {"compile": True},
    "adaptive": None,  # graph adaptive, its plan cache off: it measures in this process
}


def build(shape: str, quant: str | None, model_name: str | None = None, attention: str | None = None) -> Any:
    """``(model, pipeline)`` on CUDA: ``shape``'s random bf16 weights, or the checkpoint ``model_name``; ``quant``
    and ``attention`` are a plugin name or JSON ``{"name": ..., "options": {...}}``."""
    import torch

    from dsr1.config import load_config
    from dsr1.registry import PluginRegistry

    overrides: dict[str, Any] = {"device": "cuda"}
    for family, choice in (("quant", quant), ("attention", attention)):
        if choice:  # a name, or JSON {"name": ..., "options": {...}}
            overrides[family] = json.loads(choice) if choice.startswith("{") else choice
    if model_name:  # a trained checkpoint, in bf16 (its greedy tokens are well separated)
        from dsr1.auto import AutoModel

        model = AutoModel.from_pretrained(model_name, dtype=None if quant else torch.bfloat16, **overrides)
        return model, model.pipeline
    hf, reader = random_weights(shape, torch.bfloat16, torch.device("cuda"))
    pipeline = PluginRegistry.from_env().resolve(load_config(None, **overrides))
    model = build_random(pipeline.model_builder(hf["model_type"]), hf, reader, pipeline)
    return model, pipeline


def timed(model: Any, ids: Any, n: int) -> tuple[float, Any]:
    start = sync_time()
    out = model.generate(ids, max_new_tokens=n, ignore_eos=True)
    return sync_time() - start, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.decode_modes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b", choices=sorted(SHAPES))
    p.add_argument("--model", default=None, help="a checkpoint name or dir instead of --shape's random weights")
    p.add_argument("--batch-size", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--quant", default=None, help="a quant policy (int8, int4...) applied to the same weights")
    p.add_argument("--attention", default=None,
                   help="the attention plugin, a name or JSON {\"name\": ..., \"options\": {...}} (default: the "
                        "config's)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch

    from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass
    from dsr1.interfaces import GraphSteps

    model, pipeline = build(args.shape, args.quant, args.model, args.attention)
    bandwidth = bandwidth_gbs("cuda")
    streamed = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_tokens" not in n)
    streamed = active_bytes(model, model.config, streamed) or streamed  # MoE: a token reads only its experts
    vocab = int(model.args.vocab_size)
    rows = []
    for b in [int(x) for x in args.batch_size.split(",")]:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(100, vocab, (b, args.prompt_len), generator=g).cuda()
        row: dict[str, Any] = {"batch_size": b}
        reference = None
        for mode in args.modes.split(","):
            model.runtime.steps = GraphSteps()  # eager: the model's own forward_step
            options = MODES[mode]
            if mode == "adaptive":
                from dsr1.graph.adaptive import AdaptiveGraph, AdaptiveOptions

                model.runtime.steps = AdaptiveGraph(AdaptiveOptions(plan_cache=False)).apply(model, pipeline.device)
            elif options is not None:
                model.runtime.steps = CudaGraphPass(CudaGraphOptions(**options)).apply(model, pipeline.device)
            started = time.perf_counter()
            _, out = timed(model, ids, args.new_tokens)  # warm-up: capture and compile happen here
            warmup_s = time.perf_counter() - started
            got = decode_rate(f"{mode} batch {b}", functools.partial(timed, model, ids), b, args.prompt_len,
                              args.new_tokens, args.reps)
            entry: dict[str, Any] = {
                "decode_tok_s": round(got["decode_tok_s"], 1), "prefill_s": round(got["prefill_s"], 4),
                "generate_s": round(got["generate_s"], 4), "warmup_s": round(warmup_s, 1),
            }
            if reference is None:
                reference = out
            else:
                same = out == reference  # (B, T)
                entry["greedy_identical_to_eager"] = bool(same.all())
                if not bool(same.all()):
                    first = (~same).float().argmax(-1) - args.prompt_len  # first differing new token per row
                    entry["first_difference_per_row"] = [int(x) if not bool(s.all()) else None
                                                         for x, s in zip(first, same)]
            if mode == "adaptive":
                entry["chosen"] = model.runtime.steps.report()["buckets"]
            row[mode] = entry
            print(f"batch {b:>3} {mode:<18} decode {entry['decode_tok_s']:9.1f} tok/s  "
                  f"identical={entry.get('greedy_identical_to_eager', '-')}  warm-up {warmup_s:.1f}s", flush=True)
        fixed = {m: row[m]["decode_tok_s"] for m in MODES if m != "adaptive" and m in row}
        if "adaptive" in row and fixed:
            best = max(fixed, key=lambda m: fixed[m])
            row["best_fixed"] = best
            row["adaptive_vs_best_fixed"] = round(row["adaptive"]["decode_tok_s"] / fixed[best], 3)
            print(f"batch {b:>3} adaptive / best fixed ({best}): {row['adaptive_vs_best_fixed']:.3f}", flush=True)
        rows.append(row)
        write(args, bandwidth, streamed, rows, torch)  # after every row: a run cut short keeps its rows
    write(args, bandwidth, streamed, rows, torch)
    print(f"batch-1 floor {bandwidth * 1e9 / streamed:.1f} tok/s ({streamed / 1e9:.2f} GB at {bandwidth:.0f} GB/s)")
    return 0


def write(args: Any, bandwidth: float, streamed: int, rows: list[dict[str, Any]], torch: Any) -> None:
    floor = bandwidth * 1e9 / streamed
    report = {
        "command": "python -m dsr1.benchmarks.decode_modes " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "output"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "floor": {"streamed_bytes_per_token": streamed, "read_bandwidth_gbs": round(bandwidth, 1),
                  "batch1_decode_floor_tok_s": round(floor, 1)},
        "results": rows,
    }
    if args.output:
        write_report(report, args.output)


if __name__ == "__main__":
    raise SystemExit(main())

"""``dsr1 bench serve``: replay a request trace through the engine, in process.

A trace is a fixed list of (arrival s, prompt tokens, output tokens), drawn from ``--seed``
(Poisson arrivals at ``--rate`` requests/s, or all at once; lengths uniform in the
``--lengths`` ranges) or read from a JSONL file, and saved beside the result, so two
schedulers replay exactly the same work. Prompts are random token ids; ``--shared-prefix N``
gives every prompt the same first N tokens (what the prefix cache shares). Every request
generates exactly its output length (no eos), greedily.

Reported per scheduler: request throughput, output tok/s, TTFT (arrival → first token) and
TPOT (mean time between a request's later tokens) at p50/p99, peak KV blocks in use and
preemptions. ``--compare static`` replays the same trace through the ``static`` scheduler on
the same weights, one after the other in this process.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsr1.benchmarks.common import write_report
from dsr1.benchmarks.trace import TraceItem, draw_trace, percentile, plot, prompts_for, read_trace
from dsr1.errors import Dsr1Error


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="replay a request trace through the engine (continuous batching)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dsr1-tiny", help="model name or directory")
    p.add_argument("--url", help="drive a running dsr1 serve at this URL over HTTP (streaming) instead of an "
                                 "in-process engine (the engine's options then belong to dsr1 serve)")
    p.add_argument("--api-key", help="with --url: the server's API key")
    p.add_argument("--shape", help="a built-in shape with random weights instead of --model (see dsr1 bench)")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON) for the other families")
    p.add_argument("--device", help="device plugin (default from config)")
    p.add_argument("--requests", type=int, default=64, help="requests in a drawn trace (default 64)")
    p.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--lengths", default="uniform:16-128,8-64",
                   help="prompt and output lengths: uniform:PMIN-PMAX,OMIN-OMAX (default uniform:16-128,8-64)")
    p.add_argument("--trace", help="a JSONL trace (arrival, prompt_len, output_len per line) instead of drawing one")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt shares at its start")
    p.add_argument("--max-num-seqs", type=int, help="continuous scheduler: most running requests")
    p.add_argument("--max-num-batched-tokens", type=int, help="continuous scheduler: token budget per step")
    p.add_argument("--num-blocks", type=int, help="KV blocks in the pool (default: from free memory); --compare hf "
                                                 "gives transformers' cache the same capacity")
    p.add_argument("--compare", type=_compare_list, default=[],
                   help="also replay the trace through: static (the static scheduler on the same engine loop), hf "
                        "(transformers' generate_batch on the same weights); comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--output", help="write the JSON report here (the trace goes beside it as .trace.jsonl)")
    p.add_argument("--plot", help="write TTFT/TPOT and throughput per scheduler to this PNG")
    p.set_defaults(func=run)


COMPARE = ("static", "hf")


def _compare_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in COMPARE]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown --compare {bad[0]!r}: choose from {', '.join(COMPARE)}")
    return names


def replay(engine: Any, trace: list[TraceItem], prompts: list[list[int]], time_limit: float = 3600.0) -> dict[str, Any]:
    """Feed the trace to ``engine`` at its arrival times; per-request latencies and totals."""
    from dsr1.interfaces import SamplingParams

    # warm-up outside the clock: first calls pay one-time kernel selection and allocation
    engine.generate([prompts[0][:8]], [SamplingParams(max_tokens=2, ignore_eos=True)])
    start = time.monotonic()
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    order = list(range(len(trace)))
    nxt, peak_blocks, steps = 0, 0, 0
    while nxt < len(order) or engine.has_unfinished():
        now = time.monotonic() - start
        if now > time_limit:
            raise Dsr1Error(f"bench serve: the trace did not finish within {time_limit:.0f} s")
        while nxt < len(order) and trace[order[nxt]].arrival <= now:
            i = order[nxt]
            params = SamplingParams(max_tokens=trace[i].output_len, ignore_eos=True)
            rid = engine.add_request(prompts[i], params, request_id=f"r{i}")
            added[rid] = time.monotonic() - start
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(min(0.01, max(0.0, trace[order[nxt]].arrival - now)))
            continue
        outs = engine.step()
        steps += 1
        t = time.monotonic() - start
        peak_blocks = max(peak_blocks, engine.stats()["blocks_used"])
        for out in outs:
            first.setdefault(out.request_id, t)
            if out.finished:
                done[out.request_id] = (t, len(out.output_ids))
    total = time.monotonic() - start
    ttft = [first[r] - added[r] for r in done]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in done if done[r][1] > 1]
    out_tokens = sum(n for _, n in done.values())
    stats = engine.stats()
    return {
        "requests": len(done), "seconds": round(total, 3), "steps": steps,
        "request_throughput": round(len(done) / total, 3), "output_tok_s": round(out_tokens / total, 2),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "peak_blocks": peak_blocks, "blocks_total": stats["blocks_total"],
        "prefix_hit_rate": stats.get("prefix_hit_rate"),
    }


def _engine(args: argparse.Namespace, scheduler: str, model: Any | None) -> Any:
    from dsr1.engine import Engine

    options: dict[str, Any] = {}
    if scheduler == "continuous":
        if args.max_num_seqs is not None:
            options["max_num_seqs"] = args.max_num_seqs
        if args.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = args.max_num_batched_tokens
    elif args.max_num_seqs is not None:
        options["max_batch_size"] = args.max_num_seqs
    overrides: dict[str, Any] = {"scheduler": {"name": scheduler, "options": options}, "kvcache": "paged"}
    if args.device:
        overrides["device"] = args.device
    if model is not None:
        return Engine.with_scheduler(model, overrides["scheduler"], num_blocks=args.num_blocks)
    if args.shape:
        from dsr1.benchmarks.common import random_model

        model = random_model(args.shape, args.config, overrides)
        return Engine(model, num_blocks=args.num_blocks)
    from dsr1.auto import AutoModel

    return Engine(AutoModel.from_pretrained(args.model, args.config, **overrides), num_blocks=args.num_blocks)


def _own_trace(path: Path) -> bool:
    """Whether ``path`` is a trace this command wrote: JSON lines of exactly a :class:`TraceItem`'s fields."""
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and set(first) == {"arrival", "prompt_len", "output_len"}


def trace_path(output: str) -> Path:
    """Where the trace of a run with ``--output OUTPUT`` goes: beside it, ``.trace.jsonl``."""
    return Path(output).with_suffix(".trace.jsonl")


def run(args: argparse.Namespace) -> int:
    from dsr1.benchmarks.common import environment
    from dsr1.output_files import check_output, write_atomic

    if args.output:  # before any work: neither file may replace one that dsr1 did not write
        check_output(trace_path(args.output), "--output (its .trace.jsonl)", _own_trace)
    trace = read_trace(args.trace) if args.trace else draw_trace(args.requests, args.rate, args.lengths, args.seed)
    if args.shared_prefix < 0:
        raise Dsr1Error(f"--shared-prefix must be >= 0, got {args.shared_prefix}")
    shortest = min(it.prompt_len for it in trace)
    if args.shared_prefix > shortest:  # the prompts could not hold it: it would not be what was asked
        raise Dsr1Error(f"--shared-prefix {args.shared_prefix} is longer than the shortest prompt ({shortest} tokens); "
                        f"give at most {shortest}, or longer prompts")
    if args.url:
        from dsr1.benchmarks.serve_http import main_http

        return main_http(args, trace)
    engine = _engine(args, "continuous", None)
    prompts = prompts_for(trace, int(engine.model.args.vocab_size), args.shared_prefix, args.seed)
    longest = max(it.prompt_len + it.output_len for it in trace)
    if longest > engine.max_model_len:
        raise Dsr1Error(f"the trace's longest request needs {longest} tokens, the model's context is "
                        f"{engine.max_model_len}; " + ("shorten the trace's requests" if args.trace
                                                        else "lower --lengths"))
    if "hf" in args.compare:
        from dsr1.benchmarks.serve_hf import check_trace

        check_trace(trace)  # refused before the long work starts
    results = {"continuous": replay(engine, trace, prompts)}
    model = engine.model
    kv_tokens = engine.num_blocks * engine.block_size if args.num_blocks is not None else None
    for name in args.compare:
        del engine
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous pool's memory back to the device, so every pool sizes alike
        if name == "hf":
            from dsr1.benchmarks.serve_hf import hf_twin, replay_generate_batch

            twin = hf_twin(model, _hf_config(args))
            results["hf"] = replay_generate_batch(twin, trace, prompts, kv_tokens)
            del twin
            engine = None
            continue
        engine = _engine(args, name, model)
        results[name] = replay(engine, trace, prompts)
    report: dict[str, Any] = {
        "command": "dsr1 bench serve " + " ".join(_argv(args)),
        **environment(model.device.type), "model": args.shape or args.model, "trace": {"requests": len(trace), "rate": args.rate,
                                                     "lengths": None if args.trace else args.lengths,
                                                     "shared_prefix": args.shared_prefix, "seed": args.seed},
        "results": results,
    }
    for name in args.compare:
        a, b = results["continuous"]["output_tok_s"], results[name]["output_tok_s"]
        report[f"continuous_vs_{name}"] = round(a / b, 3) if b else None
    if args.output:
        trace_file = trace_path(args.output)
        lines = "".join(json.dumps(asdict(it)) + "\n" for it in trace)
        write_atomic(trace_file, lambda tmp: tmp.write_text(lines, encoding="utf-8"), "--output (its .trace.jsonl)",
                     _own_trace)
        report["trace_file"] = trace_file.name
    text = write_report(report, args.output)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(text)
    else:
        for name, r in results.items():
            line = f"{name:>10}: {r['requests']} requests in {r['seconds']:.2f} s, {r['output_tok_s']:.1f} output tok/s"
            if "ttft_p50_s" in r:
                line += (f", TTFT p50 {_ms(r['ttft_p50_s'])} p99 {_ms(r['ttft_p99_s'])}, TPOT p50 {_ms(r['tpot_p50_s'])} "
                         f"p99 {_ms(r['tpot_p99_s'])}, peak KV blocks {r['peak_blocks']}/{r['blocks_total']}")
            print(line)
    return 0


def _hf_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.shape:
        from dsr1.benchmarks.shapes import SHAPES

        return dict(SHAPES[args.shape])
    from dsr1.models.loading import resolve_model_dir

    config = resolve_model_dir(args.model, download=False) / "config.json"
    return dict(json.loads(config.read_text(encoding="utf-8")))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _argv(args: argparse.Namespace) -> list[str]:
    parts = []
    for key in ("model", "shape", "config", "device", "requests", "rate", "lengths", "trace", "shared_prefix",
                "max_num_seqs", "max_num_batched_tokens", "num_blocks", "compare", "seed", "output", "plot"):
        value = getattr(args, key)
        if key == "model" and args.shape:
            continue  # --shape's random weights replace the default model
        if isinstance(value, list):
            value = ",".join(value) or None
        if value is not None and not (key == "shared_prefix" and value == 0):
            parts += ["--" + key.replace("_", "-"), str(value)]
    return parts


__all__ = ["TraceItem", "draw_trace", "read_trace", "replay"]

"""Issue 16: the paged engine's decode with graph ``adaptive`` against its default (plain capture per
bucket), on one shape, both models loaded side by side and timed in alternating rounds.

    python -m dsr1.benchmarks.paged_plans --shape qwen2-7b --rows 1,8,32 --new-tokens 64 --rounds 3 \\
        --output OUT.json

For each row count ``R`` every model's engine decodes ``R`` requests of ``--prompt-len`` random
tokens together: decode tok/s = R·(N−1) / (t(N) − t(1)) over medians
(:func:`~dsr1.benchmarks.cuda_timing.decode_rate`). The first generate of each row count is a
warm-up (adaptive measures its plans for the buckets it meets there; the default captures). The
report gives each graph's median over rounds, adaptive's ratio to the default, and the plan
adaptive chose per bucket. CUDA only.
"""
from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
from typing import Any

from dsr1.benchmarks.common import environment, int_list, random_model, write_report
from dsr1.benchmarks.cuda_timing import decode_rate, require_cuda

#: the graph choices compared: the config's ``graph`` (None: not set, the runner's default). ``compile``
#: without capture is left out of adaptive's candidates: on CUDA it never beats capture, and each of its
#: trials compiles the 7B step once more
GRAPHS: dict[str, Any] = {"default": None, "adaptive": {"name": "adaptive", "options": {
    "candidates": ["eager", "cudagraph", "cudagraph+compile"]}}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.paged_plans", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b")
    p.add_argument("--rows", default="1,8,32", help="requests decoding together")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds per graph, alternating")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    require_cuda(p.prog)
    from dsr1.engine import Engine
    from dsr1.interfaces import SamplingParams

    rows_list = int_list(args.rows, "--rows")
    engines = {}
    for name, graph in GRAPHS.items():
        overrides = {"device": "cuda", "kvcache": "paged", "scheduler": "continuous"}
        if graph is not None:
            overrides["graph"] = graph
        engines[name] = Engine(random_model(args.shape, None, overrides))
    vocab = int(engines["default"].model.args.vocab_size)
    rng = random.Random(0)
    results = []
    for rows in rows_list:
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(rows)]

        def run(engine: Any, n: int) -> Any:
            return engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

        for engine in engines.values():  # warm-up: captures, adaptive's trials and compiles, the prefix cache,
            run(engine, 8)  # and the 1- and N-token calls once untimed (the first of a process ran apart from the rest)
            run(engine, 1)
            run(engine, args.new_tokens)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                got = decode_rate(f"{name} rows {rows}", lambda n, e=engine: run(e, n), rows, args.prompt_len,
                                  args.new_tokens, reps=2)
                rates[name].append(got["decode_tok_s"])
        med = {name: statistics.median(r) for name, r in rates.items()}
        results.append({"rows": rows, "decode_tok_s": {n: round(v, 1) for n, v in med.items()},
                        "rounds": {n: [round(v, 1) for v in r] for n, r in rates.items()},
                        "adaptive_vs_default": round(med["adaptive"] / med["default"], 3)})
        print(f"rows {rows}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in med.items())
              + f"; adaptive / default {results[-1]['adaptive_vs_default']:.3f}", flush=True)
    steps = engines["adaptive"].model.runtime.steps
    report = {"command": "python -m dsr1.benchmarks.paged_plans " + shlex.join(sys.argv[1:] if argv is None else argv),
              **environment("cuda"), "shape": args.shape,
              "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
                           "graphs": GRAPHS},
              "results": results, "adaptive_paged_plans": steps.report()["paged"] if steps.report else None}
    print(write_report(report, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

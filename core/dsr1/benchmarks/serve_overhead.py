"""HTTP serving against the in-process engine on the same traces (issue 14), in one run:

1. ``dsr1 serve --shape S --random-weights --config C`` starts as a subprocess; for each request
   rate the trace that ``dsr1 bench serve`` draws is replayed over HTTP (streaming
   ``/v1/completions``, TTFT at the first SSE chunk that carries a token);
2. the server gets SIGTERM (the drain is timed and its exit status kept);
3. the same model shape and config are built in this process and each trace is replayed straight
   into ``Engine.step`` (what ``dsr1 bench serve`` measures).

The HTTP overhead is the ratio of output tok/s, HTTP over in-process, per rate.

    python -m dsr1.benchmarks.serve_overhead --shape qwen2-7b --config bench/configs/serve-h200.yaml \\
        --num-blocks 16384 --output bench/results/serve/serve-h200.json

Needs ``dsr1[serve]`` (the server) and httpx (the client); runs where the config's device is.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from typing import Any

from dsr1.benchmarks.common import environment, random_model, write_report
from dsr1.benchmarks.serve import replay
from dsr1.benchmarks.serve_http import replay_http, server_model
from dsr1.benchmarks.trace import draw_trace, prompts_for

#: RATE:REQUESTS pairs: long enough at each rate for the steady state to dominate
RATES = "1:48,4:96,16:256,inf:256"


def wait_healthy(url: str, server: subprocess.Popen[bytes], limit_s: float) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if server.poll() is not None:
            raise SystemExit(f"dsr1 serve exited with {server.returncode} while loading")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"dsr1 serve was not healthy within {limit_s:.0f} s")


def over_http(args: argparse.Namespace, traces: list[Any], switch: float | None) -> tuple[list[dict[str, Any]],
                                                                                          dict[str, Any]]:
    """Replay every trace against one server; ``switch``: the server's GIL switch interval (None: Python's)."""
    import httpx

    url = f"http://127.0.0.1:{args.port}"
    argv = ["serve", "--shape", args.shape, "--random-weights", "--config", args.config, "--port", str(args.port),
            "--num-blocks", str(args.num_blocks), "--drain-timeout", "30"]
    setup = "" if switch is None else f"sys.setswitchinterval({switch}); "
    cmd = [sys.executable, "-c", f"import sys; {setup}from dsr1.cli import main; sys.exit(main({argv!r}))"]
    server = subprocess.Popen(cmd)
    try:
        load_s = wait_healthy(url, server, 600)
        model = server_model(url, None)
        results = []
        for i, trace in enumerate(traces):
            prompts = prompts_for(trace, int(model["vocab_size"]), 0, args.seed + i)
            results.append(asyncio.run(replay_http(url, trace, prompts, str(model["id"]))))
            print("http", results[-1], flush=True)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        server_info = {"command": "dsr1 " + " ".join(argv), "switch_interval_s": switch, "load_s": round(load_s, 1),
                       "sigterm_exit_code": code, "sigterm_exit_s": round(time.monotonic() - sent, 2),
                       "metrics_lines": sum(1 for line in metrics.splitlines() if line.startswith("dsr1_"))}
        return results, server_info
    finally:
        if server.poll() is None:
            server.kill()


def in_process(args: argparse.Namespace, traces: list[Any]) -> list[dict[str, Any]]:
    from dsr1.engine import Engine

    engine = Engine(random_model(args.shape, args.config, {}), num_blocks=args.num_blocks)
    vocab = int(engine.model.args.vocab_size)
    results = []
    for i, trace in enumerate(traces):
        results.append(replay(engine, trace, prompts_for(trace, vocab, 0, args.seed + i)))
        print("in-process", results[-1], flush=True)
    del engine
    gc.collect()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.serve_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b")
    p.add_argument("--config", default="bench/configs/serve-h200.yaml")
    p.add_argument("--num-blocks", type=int, default=16384)
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", default=RATES, help=f"RATE:REQUESTS,... (default {RATES})")
    p.add_argument("--lengths", default="uniform:64-1024,32-512")
    p.add_argument("--switch-intervals", default="none",
                   help="comma-separated GIL switch intervals (s) to run the server with; none: Python's own")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    rates = [(float(r), int(n)) for r, n in (pair.split(":") for pair in args.rates.split(","))]
    # trace i draws its lengths and prompt ids from seed + i: no prompt repeats an earlier trace's, so the
    # prefix cache (kept across traces on both sides) finds nothing it should not
    traces = [draw_trace(n, rate, args.lengths, args.seed + i) for i, (rate, n) in enumerate(rates)]
    switches = [None if x == "none" else float(x) for x in args.switch_intervals.split(",")]
    servers = [over_http(args, traces, switch) for switch in switches]
    local = in_process(args, traces)
    runs = []
    for i, ((rate, n), e) in enumerate(zip(rates, local)):
        for http, server in servers:
            h = http[i]
            runs.append({"rate": rate, "requests": n, "switch_interval_s": server["switch_interval_s"], "http": h,
                         "in_process": e, "http_over_in_process": round(h["output_tok_s"] / e["output_tok_s"], 3)})
    report = {
        "command": "python -m dsr1.benchmarks.serve_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        **environment("cuda"), "model": args.shape, "config": args.config, "num_blocks": args.num_blocks,
        "lengths": args.lengths, "seed": args.seed, "servers": [s for _, s in servers], "runs": runs,
        "uvicorn_extras": {m: _has(m) for m in ("uvloop", "httptools")},
    }
    write_report(report, args.output)
    for r in runs:
        print(f"rate {r['rate']} switch {r['switch_interval_s']}: http {r['http']['output_tok_s']} tok/s, "
              f"in-process {r['in_process']['output_tok_s']} tok/s, ratio {r['http_over_in_process']}")
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # the server subprocess's log lines as they come
    raise SystemExit(main())

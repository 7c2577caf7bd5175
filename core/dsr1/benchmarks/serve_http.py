"""``dsr1 bench serve --url URL``: replay the same request trace against a running ``dsr1 serve``.

Each request is a streaming ``/v1/completions`` call sent at its arrival time, its prompt the
same random token ids the in-process bench uses (so the two replay identical work), greedy,
``ignore_eos`` and ``max_tokens`` = its output length. TTFT is measured from the moment the
request is sent to the first server-sent event that carries a token; TPOT from there to the last
one, per later token. The result has the in-process bench's keys, so the two compare directly
(the HTTP overhead is their ``output_tok_s`` ratio).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from dsr1.benchmarks.trace import TraceItem, percentile, plot, prompts_for
from dsr1.errors import Dsr1Error


async def _one(client: Any, url: str, model: str, prompt: list[int], item: TraceItem, start: float,
               headers: dict[str, str]) -> tuple[float, float | None, float, int]:
    """(sent, first token, done) seconds from ``start``, and the tokens the server reported."""
    body = {"model": model, "prompt": prompt, "max_tokens": item.output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.monotonic() - start
    first: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")
            raise Dsr1Error(f"bench serve --url: the server answered {r.status_code}: {text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise Dsr1Error(f"bench serve --url: the stream failed: {event['error'].get('message')}")
            if event.get("choices") and first is None:
                first = time.monotonic() - start
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    return sent, first, time.monotonic() - start, tokens


async def replay_http(url: str, trace: list[TraceItem], prompts: list[list[int]], model: str,
                      api_key: str | None = None, time_limit: float = 3600.0) -> dict[str, Any]:
    """Send the trace to ``url`` at its arrival times; per-request latencies and totals."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(trace) + 1, max_keepalive_connections=len(trace) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit), limits=limits) as client:
        # warm-up outside the clock, as the in-process bench does
        await _one(client, url, model, prompts[0][:8], TraceItem(0.0, 8, 2), time.monotonic(), headers)
        start = time.monotonic()

        async def at_arrival(i: int) -> tuple[float, float | None, float, int]:
            await asyncio.sleep(max(0.0, trace[i].arrival - (time.monotonic() - start)))
            return await _one(client, url, model, prompts[i], trace[i], start, headers)

        try:
            results = await asyncio.wait_for(asyncio.gather(*(at_arrival(i) for i in range(len(trace)))), time_limit)
        except asyncio.TimeoutError:
            raise Dsr1Error(f"bench serve --url: the trace did not finish within {time_limit:.0f} s") from None
    total = time.monotonic() - start
    ttft = [first - sent for sent, first, _, _ in results if first is not None]
    tpot = [(done - first) / (n - 1) for _, first, done, n in results if first is not None and n > 1]
    out_tokens = sum(n for *_, n in results)
    return {
        "requests": len(results), "seconds": round(total, 3),
        "request_throughput": round(len(results) / total, 3), "output_tok_s": round(out_tokens / total, 2),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
    }


def server_model(url: str, api_key: str | None) -> dict[str, Any]:
    """The server's one model entry (``/v1/models``): its id, context and vocabulary size."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as err:
        raise Dsr1Error(f"bench serve --url: cannot reach {url}: {err}; is dsr1 serve running there?") from None
    if r.status_code != 200 or not r.json().get("data"):
        raise Dsr1Error(f"bench serve --url: {url}/v1/models answered {r.status_code} with no model (still "
                        f"loading? pass --api-key if the server has one)")
    return dict(r.json()["data"][0])


def run_http(args: argparse.Namespace, trace: list[TraceItem]) -> dict[str, Any]:
    """The ``results`` entry of a ``--url`` run (the trace drawn or read as for the in-process bench)."""
    try:
        import httpx  # noqa: F401 - only checking that it is installed
    except ImportError:
        raise Dsr1Error("bench serve --url needs httpx: pip install 'dsr1[serve]'") from None
    url = args.url.rstrip("/")
    model = server_model(url, args.api_key)
    context, vocab = model.get("max_model_len"), model.get("vocab_size")
    longest = max(it.prompt_len + it.output_len for it in trace)
    if isinstance(context, int) and longest > context:
        raise Dsr1Error(f"the trace's longest request needs {longest} tokens, the served model's context is "
                        f"{context}; lower --lengths")
    prompts = prompts_for(trace, int(vocab) if isinstance(vocab, int) else 4096, args.shared_prefix, args.seed)
    return asyncio.run(replay_http(url, trace, prompts, str(model["id"]), args.api_key))


def main_http(args: argparse.Namespace, trace: list[TraceItem]) -> int:
    """``dsr1 bench serve --url``: replay, then report as the in-process bench does."""
    from dsr1.benchmarks.common import environment, write_report

    if args.compare:
        raise Dsr1Error("--compare replays in process; it does not go with --url (run the in-process bench on the "
                        "same trace for the HTTP overhead)")
    engine_options = ("shape", "config", "device", "max_num_seqs", "max_num_batched_tokens", "num_blocks")
    given = [name for name in engine_options if getattr(args, name) is not None]
    if args.model != "dsr1-tiny":
        given.insert(0, "model")
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise Dsr1Error(f"{flag} sets up the in-process engine; with --url the server's own engine runs (set it up "
                        f"when starting dsr1 serve: --model, --config, --num-blocks)")
    result = run_http(args, trace)
    parts = ["--url", args.url, "--requests", str(args.requests), "--rate", str(args.rate), "--seed", str(args.seed)]
    parts += ["--trace", args.trace] if args.trace else ["--lengths", args.lengths]
    if args.shared_prefix:
        parts += ["--shared-prefix", str(args.shared_prefix)]
    import torch

    report: dict[str, Any] = {
        "command": "dsr1 bench serve " + " ".join(parts), **environment("cuda" if torch.cuda.is_available() else "cpu"),
        "url": args.url, "trace": {"requests": len(trace), "rate": args.rate,
                                   "lengths": None if args.trace else args.lengths,
                                   "shared_prefix": args.shared_prefix, "seed": args.seed},
        "results": {"http": result},
    }
    text = write_report(report, args.output)
    if args.plot:
        plot(report["results"], args.plot)
    if args.json:
        print(text)
    else:
        ms = [("-" if v is None else f"{v * 1000:.1f} ms") for v in
              (result["ttft_p50_s"], result["ttft_p99_s"], result["tpot_p50_s"], result["tpot_p99_s"])]
        print(f"      http: {result['requests']} requests in {result['seconds']:.2f} s, {result['output_tok_s']:.1f} "
              f"output tok/s, TTFT p50 {ms[0]} p99 {ms[1]}, TPOT p50 {ms[2]} p99 {ms[3]}")
    return 0


__all__ = ["main_http", "replay_http", "run_http", "server_model"]

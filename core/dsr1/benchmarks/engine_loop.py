"""Engine figures that a trace replay does not give, in one process on one set of shapes (issue 13):

* **decode-step roofline**: ``R`` requests with ``C``-token prompts all decoding; the median
  ``engine.step()`` (everything a user waits for: scheduling, the captured step, sampling) and
  the median runner decode alone (CUDA events), against (weight bytes read per step + K/V bytes
  the attention reads) / device bandwidth measured here;
* **batch 1**: decode tok/s of ``model.generate`` on the fused CUDA-graph path (contiguous cache,
  ``graph: cudagraph`` compiled at batch 1) and of the engine decoding one request;
* **prefix cache**: TTFT of requests sharing a ``P``-token system prompt, one at a time, with the
  prefix cache on and off (the first request, which fills the cache, is not counted).

    python -m dsr1.benchmarks.engine_loop --shape qwen2-7b --output bench/results/engine/engine-h200.json

CUDA only.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
from typing import Any

from dsr1.benchmarks.common import bandwidth_gbs, environment, random_model, write_report
from dsr1.benchmarks.cuda_timing import decode_rate, require_cuda, sync_time


def weight_bytes_per_step(model: Any) -> int:
    """Every parameter is read once per decode step except the embedding table (a few rows)."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - embed.numel() * embed.element_size()


def kv_bytes_per_token(model: Any) -> int:
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.dtype.itemsize


def engine_for(model: Any, prefix_caching: bool = True, **options: Any) -> Any:
    from dsr1.engine import Engine

    engine = Engine.with_scheduler(model, {"name": "continuous", "options": options})
    engine.blocks.prefix_caching = prefix_caching
    return engine


def release() -> None:
    """Give the memory of the objects the caller just deleted back to the device."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def roofline(model: Any, rows: int, ctx: int, steps: int, bandwidth: float, rng: random.Random) -> dict[str, Any]:
    import torch

    from dsr1.interfaces import SamplingParams

    engine = engine_for(model, max_num_seqs=rows, max_num_batched_tokens=8192)
    vocab = int(model.args.vocab_size)
    for _ in range(rows):
        engine.add_request([rng.randrange(vocab) for _ in range(ctx)], SamplingParams(max_tokens=steps + 8,
                                                                                         ignore_eos=True))
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < len(r.prompt_ids)
                                              for r in engine.requests.values()):
        engine.step()
    for _ in range(3):  # every request decoding; the bucket's graph captured
        engine.step()
    step_times = []
    decode = engine.runner.static_decode
    original = decode.__call__ if decode is not None else None
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(group: Any) -> torch.Tensor:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = original(group)  # type: ignore[misc]
        b.record()
        events.append((a, b))
        return out

    if decode is not None:
        engine.runner._decode = lambda group: timed(group)  # type: ignore[method-assign]
    contexts = []
    for _ in range(steps):
        contexts.append(sum(r.num_computed_tokens + 1 for r in engine.requests.values()))
        t0 = sync_time()
        engine.step()
        step_times.append(sync_time() - t0)
    torch.cuda.synchronize()
    runner_times = [a.elapsed_time(b) / 1000 for a, b in events]
    weights = weight_bytes_per_step(model)
    kv = statistics.median(contexts) * kv_bytes_per_token(model)
    floor = (weights + kv) / (bandwidth * 1e9)
    step = statistics.median(step_times)
    out = {"rows": rows, "context": ctx, "steps": steps, "weight_bytes": weights, "kv_bytes": int(kv),
           "floor_ms": round(floor * 1e3, 3), "engine_step_ms": round(step * 1e3, 3),
           "engine_step_roofline_pct": round(100 * floor / step, 1), "graph": decode is not None}
    if runner_times:
        run = statistics.median(runner_times)
        out.update({"runner_decode_ms": round(run * 1e3, 3), "runner_decode_roofline_pct": round(100 * floor / run, 1)})
    del engine
    release()
    return out


def engine_batch1(model: Any, prompt: int, new: int, rng: random.Random) -> dict[str, Any]:
    """Decode tok/s of the engine generating for one request (graphs captured by a warm-up call).
    The caller runs :func:`release` once the engine is gone."""
    from dsr1.interfaces import SamplingParams

    engine = engine_for(model)
    ids = [rng.randrange(int(model.args.vocab_size)) for _ in range(prompt)]
    engine.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))  # warm: graphs captured
    got = decode_rate("engine batch 1", lambda n: engine.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True)),
                      1, prompt, new)
    return {"prompt": prompt, "new_tokens": new, "decode_tok_s": round(got["decode_tok_s"], 1)}


def generate_batch1(shape: str, prompt: int, new: int) -> dict[str, Any]:
    """Decode tok/s of ``model.generate`` at batch 1 on the fused path (cudagraph, compiled). The caller
    runs :func:`release` once the model is gone."""
    import torch

    model = random_model(shape, None, {"device": "cuda", "graph": {"name": "cudagraph", "options": {"compile": True}}})
    ids = torch.randint(0, int(model.args.vocab_size), (1, prompt), device="cuda")
    for _ in range(2):
        model.generate(ids, max_new_tokens=8, ignore_eos=True)
    got = decode_rate("generate batch 1", lambda n: model.generate(ids, max_new_tokens=n, ignore_eos=True),
                      1, prompt, new)
    return {"prompt": prompt, "new_tokens": new, "decode_tok_s": round(got["decode_tok_s"], 1)}


def prefix_ttft(model: Any, system: int, suffix: int, count: int, rng: random.Random) -> dict[str, Any]:
    from dsr1.interfaces import SamplingParams

    vocab = int(model.args.vocab_size)
    shared = [rng.randrange(vocab) for _ in range(system)]
    prompts = [shared + [rng.randrange(vocab) for _ in range(suffix)] for _ in range(count + 1)]
    out: dict[str, Any] = {"system_tokens": system, "suffix_tokens": suffix, "requests": count}
    for on in (True, False):
        engine = engine_for(model, prefix_caching=on, max_num_batched_tokens=8192)
        engine.generate([[rng.randrange(vocab) for _ in range(64)]], SamplingParams(max_tokens=2, ignore_eos=True))
        ttfts = []
        for i, p in enumerate(prompts):
            t0 = sync_time()
            engine.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
            if i:  # the first one fills the cache
                ttfts.append(sync_time() - t0)
        out["on" if on else "off"] = {"ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 2),
                                      "prefix_hit_rate": engine.stats().get("prefix_hit_rate")}
        del engine
        release()
    out["speedup"] = round(out["off"]["ttft_p50_ms"] / out["on"]["ttft_p50_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.engine_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b")
    p.add_argument("--output", required=True)
    p.add_argument("--only", choices=["prefix"], help="only the prefix-cache figure")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    rng = random.Random(0)
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"command": "python -m dsr1.benchmarks.engine_loop " + " ".join(argv),
                              **environment("cuda"), "shape": args.shape}
    if args.only is None:
        report["bandwidth_gbs"] = bandwidth = bandwidth_gbs("cuda")
        report["batch1_generate_fused"] = generate_batch1(args.shape, 128, 129)
        release()
    model = random_model(args.shape, None, {"device": "cuda", "kvcache": "paged", "scheduler": "continuous"})
    if args.only is None:
        report["batch1_engine"] = engine_batch1(model, 128, 129, rng)
        release()
        report["roofline"] = [roofline(model, rows, ctx, 20, bandwidth, rng) for rows, ctx in ((128, 1024), (256, 512))]
    report["prefix_cache"] = prefix_ttft(model, 2000, 32, 8, rng)
    print(write_report(report, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

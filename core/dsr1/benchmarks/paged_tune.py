"""Where the engine's decode step spends its time (issue 13): the paged Triton kernel alone over
launch settings, and a profile of one uncaptured static decode step and one prefix-hit prefill.

    python -m dsr1.benchmarks.paged_tune --output bench/results/engine/paged-tune-h200.json

Kernel figures: median of 20 CUDA-event timings per setting (:func:`~dsr1.benchmarks.cuda_timing.median_ms`,
3 warm-up calls); GB/s = K/V bytes the rows read / time. CUDA only.
"""
# ruff: noqa: B023 - each lambda made in a loop is timed within the same iteration
from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from dsr1.benchmarks.common import environment, random_model, write_report
from dsr1.benchmarks.cuda_timing import median_ms, require_cuda


def kernel_matrix() -> list[dict[str, Any]]:
    import torch

    from dsr1.engine.paged_triton import paged_decode

    h, hkv, d, bs = 28, 4, 128, 16
    rows = []
    for b, ctx in ((128, 1024), (256, 512), (1, 1024), (32, 4096)):
        nb = b * ctx // bs + 1
        k_pool = torch.randn((nb, bs, hkv, d), device="cuda", dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        perm = torch.randperm(nb - 1, device="cuda").to(torch.int32)
        width = 32768 // bs  # the engine's table width (Qwen2's context)
        tables = torch.zeros((b, width), dtype=torch.int32, device="cuda")
        tables[:, : ctx // bs] = perm[: b * ctx // bs].view(b, -1)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn((b, h, d), device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * b * ctx * hkv * d * 2
        for tile in (32, 64, 128):
            for splits in (None, 1, 2, 4):
                for warps in (4, 8):
                    for stages in (2, 3):
                        setting: dict[str, Any] = {"rows": b, "ctx": ctx, "tile": tile, "splits": splits, "warps": warps,
                                   "stages": stages}
                        try:
                            ms = median_ms(lambda: paged_decode(q, k_pool, v_pool, tables, lens, d**-0.5, None,
                                                                splits, tile, warps, stages), warmup=3, reps=20)
                        except Exception as e:  # noqa: BLE001 - a setting that does not compile is a result too
                            rows.append({**setting, "error": str(e).splitlines()[0][:160]})
                            continue
                        rows.append({**setting, "ms": round(ms, 4), "gbs": round(kv_bytes / ms / 1e6, 1)})
        best = min((r for r in rows if r["rows"] == b and "ms" in r), key=lambda r: r["ms"])
        default = next(r for r in rows if r["rows"] == b and r.get("splits") is None and r["tile"] == 64
                       and r["warps"] == 4 and r["stages"] == 3)
        print(f"B={b} ctx={ctx}: default {default.get('ms')} ms {default.get('gbs')} GB/s; best {best}", flush=True)
    return rows


def profile_steps() -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsr1.engine import Engine
    from dsr1.interfaces import SamplingParams

    model = random_model("qwen2-7b", None, {"device": "cuda", "kvcache": "paged", "scheduler": "continuous"})
    engine = Engine.with_scheduler(model, {"name": "continuous", "options": {"max_num_seqs": 128,
                                                                            "max_num_batched_tokens": 8192}})
    runner: Any = engine.runner  # the paged runner: its static decode step is what is profiled
    rng = random.Random(0)
    vocab = int(model.args.vocab_size)
    for _ in range(128):
        engine.add_request([rng.randrange(vocab) for _ in range(1024)], SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(25):
        engine.step()
    runner.static_decode.capture = False  # the same static step, uncaptured, so the profiler sees kernels
    out: dict[str, Any] = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table, flush=True)
    out["decode_step_uncaptured_top"] = table
    runner.static_decode.capture = True
    while engine.has_unfinished():
        engine.step()
    shared = [rng.randrange(vocab) for _ in range(2000)]
    engine.generate([shared + [1, 2, 3]], SamplingParams(max_tokens=1, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate([shared + [rng.randrange(vocab) for _ in range(32)]], SamplingParams(max_tokens=1,
                                                                                            ignore_eos=True))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table, flush=True)
    out["prefix_hit_prefill_top"] = table
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.paged_tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    require_cuda(p.prog)
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"command": "python -m dsr1.benchmarks.paged_tune " + " ".join(argv),
                              **environment("cuda")}
    report["kernel"] = kernel_matrix()
    report.update(profile_steps())
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Kernel times of eager static decode steps on CUDA: where does a decode step go?

    python -m dsr1.benchmarks.decode_profile --shape deepseek-v2-lite --batch-size 1,32

Random bf16 weights of ``--shape``; for each batch size, a static cache of 256 slots, three warm-up
``decode_static`` calls, then five profiled ones. Prints the GPU kernel time per step and the
torch profiler table by kernel time (the captured graph replays the same kernels without the
launch gaps). Prints only; nothing is written. CUDA only.
"""
from __future__ import annotations

import argparse

from dsr1.benchmarks.common import int_list
from dsr1.benchmarks.cuda_timing import require_cuda
from dsr1.benchmarks.shapes import SHAPES, build_random, random_weights

#: static cache slots (the contiguous cache's granularity: its buffers are exactly this long), and the position
#: the profiled token decodes at.
SLOTS, POSITION = 256, 100


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.decode_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-7b")
    p.add_argument("--batch-size", default="1,32")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    batches = int_list(args.batch_size, "--batch-size")
    require_cuda(p.prog)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsr1.config import load_config
    from dsr1.registry import PluginRegistry

    hf, reader = random_weights(args.shape, torch.bfloat16, torch.device("cuda"))
    pipeline = PluginRegistry.from_env().resolve(load_config(None, device="cuda"))
    model = build_random(pipeline.model_builder(hf["model_type"]), hf, reader, pipeline)
    cache = pipeline.kvcache
    for b in batches:
        cache.allocate(model.cache_shape(b, SLOTS), model.dtype, model.device)
        model.rope.ensure(SLOTS, model.dtype)
        ids = torch.randint(100, 1000, (b, 1), device="cuda")
        pos = torch.full((b, 1), POSITION, device="cuda")
        slot = torch.tensor([POSITION], device="cuda")
        seen = torch.ones(b, SLOTS, dtype=torch.bool, device="cuda")
        with torch.inference_mode():
            for _ in range(3):
                model.decode_static(ids, pos, slot, seen, cache)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    model.decode_static(ids, pos, slot, seen, cache)
                torch.cuda.synchronize()
        table = prof.key_averages()
        per_step = sum(e.device_time_total for e in table) / args.steps / 1000
        print(f"=== {args.shape} batch {b}: GPU kernel time per step {per_step:.2f} ms")
        print(table.table(sort_by="device_time_total", row_limit=22, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

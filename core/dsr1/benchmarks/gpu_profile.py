"""Profile one dsr1 ``generate(max_new_tokens=1)`` on CUDA: where does prefill go?

    python -m dsr1.benchmarks.gpu_profile [--shape tiny-125m]

Random bf16 weights of ``--shape``; prints the mean time of ``generate(1)``, of a cache-free
``forward_step`` and of a full-logits forward (5 calls each after a warm-up), then torch
profiler tables by CUDA and CPU time. Prints only; nothing is written. CUDA only.
"""
from __future__ import annotations

import argparse

from dsr1.benchmarks.cuda_timing import require_cuda, sync_time
from dsr1.benchmarks.shapes import SHAPES, build_random, random_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.gpu_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape_positional", nargs="?", metavar="SHAPE", help=argparse.SUPPRESS)  # the old argv[1]
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default tiny-125m)")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsr1.config import load_config
    from dsr1.registry import PluginRegistry

    shape = args.shape or args.shape_positional or "tiny-125m"
    dev = torch.device("cuda")
    hf, reader = random_weights(shape, torch.bfloat16, dev)
    pipeline = PluginRegistry.from_env().resolve(load_config(None, device="cuda"))
    builder = pipeline.model_builder(hf["model_type"])
    builder.options = type(builder.options).model_validate({**builder.options.model_dump(), "dtype": "bfloat16"})
    model = build_random(builder, hf, reader, pipeline)
    ids = torch.randint(100, 30000, (1, 128), device=dev)
    pos = torch.arange(128, device=dev)[None]
    for _ in range(3):
        model.generate(ids, max_new_tokens=1, ignore_eos=True)
    for label, fn in [
        ("generate(1)", lambda: model.generate(ids, max_new_tokens=1, ignore_eos=True)),
        ("forward_step no cache", lambda: model.forward_step(ids, pos, 0, None, None, None, True)),
        ("forward (full logits)", lambda: model(ids)),
    ]:
        with torch.inference_mode():
            fn()
            start = sync_time()
            for _ in range(5):
                fn()
            print(f"{label:24s} {(sync_time() - start) / 5 * 1e3:8.2f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=1, ignore_eos=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

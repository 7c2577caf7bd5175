"""2:4 sparse linear layers against dense ones on the H200 (issue 7), one process, same weights.

    python bench/h200_semi24.py --output OUT.json

For each Qwen2-7B linear shape and batch size: a bf16 weight pruned 2:4 by the ``semi24``
strategy's own mask (magnitude within groups of four), then timed as a dense matmul and as
``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores), with CUDA events, median of
50 after 10 warm-ups. Also checks the two give the same result (max abs difference).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dsr1_pruning_semi24 import Semi24Pruner

from cuda_timing import QWEN2_7B_LINEARS, median_ms  # bench/cuda_timing.py, a sibling module

SHAPES = QWEN2_7B_LINEARS


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", default="1,32,128,512,2048")
    p.add_argument("--output")
    args = p.parse_args()
    from torch.sparse import to_sparse_semi_structured

    pruner = Semi24Pruner()
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(out_f, in_f, device="cuda", generator=g).to(torch.bfloat16)
        w = w * pruner.mask(w, 0.5)
        sparse = to_sparse_semi_structured(w)
        for b in [int(x) for x in args.batch_size.split(",")]:
            x = torch.randn(b, in_f, device="cuda", generator=g).to(torch.bfloat16)
            dense_ms = median_ms(lambda: F.linear(x, w))
            sparse_ms = median_ms(lambda: F.linear(x, sparse))
            diff = (F.linear(x, w) - F.linear(x, sparse)).abs().max().item()
            rows.append({"layer": name, "shape": [out_f, in_f], "batch_size": b, "dense_ms": round(dense_ms, 4),
                         "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 3),
                         "max_abs_diff": diff})
            print(f"{name:<13} b={b:<5} dense {dense_ms:.4f} ms  2:4 {sparse_ms:.4f} ms  {dense_ms / sparse_ms:.2f}x",
                  flush=True)
    report = {"command": "python bench/h200_semi24.py --batch-size " + args.batch_size,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

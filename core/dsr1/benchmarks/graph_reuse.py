"""Successive captured generates on Qwen2-7B-shaped random weights (issue 19, class 8).

    python -m dsr1.benchmarks.graph_reuse [--shape qwen2-7b] [--calls 4] [--batch 64] [--new-tokens 128] [--output F]

The trace that once broke the CUDA-graph decode for good: prompts from ``random.Random(0)``
(lengths ``randint(64, 1024)``, ids ``randrange(100, 150000)``), left-padded batches of 64 in
order, 128 new tokens, graph ``cudagraph``, kvcache ``contiguous``. Each call's outcome (ok,
or the error's first line) and time are recorded; a failed call is followed by a batch-8 call to
show whether the model is still usable. CUDA only.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from dsr1.benchmarks.common import write_report
from dsr1.benchmarks.cuda_timing import require_cuda
from dsr1.benchmarks.decode_modes import build


def batch(rng: random.Random, n: int, vocab: int) -> tuple[Any, Any]:
    import torch

    top = min(150000, vocab)  # Qwen2-7B's trace; a smaller vocabulary caps the ids
    rows = [[rng.randrange(100, top) for _ in range(rng.randint(64, 1024))] for _ in range(n)]
    t = max(len(r) for r in rows)
    ids = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    return ids.cuda(), mask.cuda()


def call(model: Any, ids: Any, mask: Any, n: int) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    try:
        model.generate(ids, mask, max_new_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
        outcome = "ok"
    except Exception as err:  # noqa: BLE001 - recorded: this benchmark reports failures, it does not hide them
        outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return {"batch": int(ids.shape[0]), "longest": int(ids.shape[1]), "outcome": outcome,
            "seconds": round(time.perf_counter() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.graph_reuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-7b", help="model shape, random bf16 weights (default qwen2-7b)")
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--output")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch

    from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass

    model, pipeline = build(args.shape, None)
    model.runtime.steps = CudaGraphPass(CudaGraphOptions()).apply(model, pipeline.device)
    vocab = int(model.args.vocab_size)
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for i in range(args.calls):
        ids, mask = batch(rng, args.batch, vocab)
        rows.append({"call": i, **call(model, ids, mask, args.new_tokens)})
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["outcome"] != "ok":
            ids, mask = batch(random.Random(1), 8, vocab)
            rows.append({"call": f"{i}-after", **call(model, ids, mask, 16)})
            print(json.dumps(rows[-1]), flush=True)
    argv = sys.argv[1:] if argv is None else argv
    report = {"command": " ".join(["python", "-m", "dsr1.benchmarks.graph_reuse", *argv]),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "calls": rows}
    if args.output:
        write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

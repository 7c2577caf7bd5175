"""Successive captured generates on Qwen2-7B-shaped random weights (issue 19, class 8).

    python bench/h200_graph_reuse.py [--calls 4] [--batch 64] [--new-tokens 128] [--output OUT.json]

The trace that once broke the CUDA-graph decode for good: prompts from ``random.Random(0)``
(lengths ``randint(64, 1024)``, ids ``randrange(100, 150000)``), left-padded batches of 64 in
order, 128 new tokens, graph ``cudagraph``, kvcache ``contiguous``. Each call's outcome (ok,
or the error's first line) and time are recorded; a failed call is followed by a batch-8 call to
show whether the model is still usable.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from h200_decode import build  # noqa: E402  (bench/ is not a package)


def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[rng.randrange(100, 150000) for _ in range(rng.randint(64, 1024))] for _ in range(n)]
    t = max(len(r) for r in rows)
    ids = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    return ids.cuda(), mask.cuda()


def call(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        model.generate(ids, mask, max_new_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
        outcome = "ok"
    except Exception as err:  # noqa: BLE001 - recorded: this script reports failures, it does not hide them
        outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return {"batch": int(ids.shape[0]), "longest": int(ids.shape[1]), "outcome": outcome,
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--output")
    args = p.parse_args()
    model, pipeline = build("qwen2-7b", None)
    from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass

    model.runtime.steps = CudaGraphPass(CudaGraphOptions()).apply(model, pipeline.device)
    rng = random.Random(0)
    rows = []
    for i in range(args.calls):
        ids, mask = batch(rng, args.batch)
        rows.append({"call": i, **call(model, ids, mask, args.new_tokens)})
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["outcome"] != "ok":
            ids, mask = batch(random.Random(1), 8)
            rows.append({"call": f"{i}-after", **call(model, ids, mask, 16)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "calls": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

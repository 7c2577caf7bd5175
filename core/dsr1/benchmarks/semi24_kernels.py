"""2:4 sparse linear layers against dense ones on CUDA (issue 7), one process, same weights.

    python -m dsr1.benchmarks.semi24_kernels --batch-size 32,128,512,2048,8192 --output OUT.json

For each Qwen2-7B linear shape and batch size (rows of ``x``): a bf16 weight pruned 2:4 by the
``semi24`` strategy's own mask (magnitude within groups of four), timed as a dense ``F.linear``
and as ``F.linear`` on ``torch.sparse.to_sparse_semi_structured`` of it, once per sparse back end
(``cusparselt``, torch's default, and ``cutlass``, forced through
``SparseSemiStructuredTensor._FORCE_CUTLASS``). Two timers (:mod:`dsr1.benchmarks.cuda_timing`):
``eager`` (CUDA events around each call: includes host-side set-up that outlasts the kernels) and
``graph`` (20 calls captured in a CUDA graph: device time only, what a captured step pays). Each
sparse result is checked against the dense one (max abs difference). CUDA only; needs the
``dsr1-pruning-semi24`` plugin.
"""
# ruff: noqa: B023 - each lambda made in a loop is timed within the same iteration
from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

from dsr1.benchmarks.cuda_timing import QWEN2_7B_LINEARS, error_line, graph_ms, kernel_report, median_ms, require_cuda

SHAPES = QWEN2_7B_LINEARS
TIMERS: dict[str, Callable[[Callable[[], object]], float]] = {"eager": median_ms, "graph": graph_ms}


def sparse_weight(w: Any, backend: str) -> Any:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.semi24_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", default="32,128,512,2048,8192")
    p.add_argument("--backends", default="cusparselt,cutlass")
    p.add_argument("--output")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch
    import torch.nn.functional as F

    from dsr1_pruning_semi24 import Semi24Pruner

    pruner = Semi24Pruner()
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(out_f, in_f, device="cuda", generator=g).to(torch.bfloat16)
        w = w * pruner.mask(w, 0.5)
        sparse: dict[str, Any] = {}
        for backend in args.backends.split(","):
            try:
                sparse[backend] = sparse_weight(w, backend)
            except Exception as err:  # noqa: BLE001 - a back end this build lacks: say so, time the others
                rows.append({"layer": name, "backend": backend, "error": f"{type(err).__name__}: {err}"})
        for b in [int(x) for x in args.batch_size.split(",")]:
            x = torch.randn(b, in_f, device="cuda", generator=g).to(torch.bfloat16)
            dense_out = F.linear(x, w)
            entry: dict[str, Any] = {"layer": name, "shape": [out_f, in_f], "batch_size": b}
            for timer, time_ms in TIMERS.items():
                entry[f"dense_{timer}_ms"] = round(time_ms(lambda: F.linear(x, w)), 4)
            for backend, ws in sparse.items():
                try:
                    entry[f"{backend}_max_abs_diff"] = float((F.linear(x, ws) - dense_out).abs().max())
                except RuntimeError as err:  # e.g. torch's CUTLASS 2:4 kernels are built for sm8x only
                    entry[f"{backend}_error"] = str(err).splitlines()[0]
                    continue
                for timer, time_ms in TIMERS.items():
                    try:
                        ms = time_ms(functools.partial(F.linear, x, ws))
                    except Exception as err:  # noqa: BLE001
                        entry[f"{backend}_{timer}_error"] = error_line(err)
                        continue
                    entry[f"{backend}_{timer}_ms"] = round(ms, 4)
                    entry[f"{backend}_{timer}_speedup"] = round(entry[f"dense_{timer}_ms"] / ms, 3)
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    kernel_report(f"python -m dsr1.benchmarks.semi24_kernels --batch-size {args.batch_size} --backends {args.backends}",
                  rows, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

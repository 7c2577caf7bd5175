"""fp32 linear kernels on the CPU: tiny-125m's 49 matmuls of one forward, by row count.

Three layouts of the same random weights, timed in one process: MKL on the ``kn`` layout
(what the engine loads), oneDNN on its packed layout (``dsr1.models.packing``) and the cpu
device's panel kernel (``dsr1_device_cpu.panels``). Up to 16 rows a 240 MB buffer is read
before each timed call, so the weights come from DRAM as in decode; past that they are compute
bound and timed back to back. Each repetition runs the three in turn; medians, in ms per forward.

    python -m dsr1.benchmarks.cpu_linear_kernels --output bench/results/cpu-linear-kernels.json

Huge-page allocations are turned on as the CLI runs the engine (:func:`dsr1.hugepages.enable_huge_pages`),
in :func:`main` before torch is imported. Needs the ``dsr1-device-cpu`` plugin and AVX-512.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from dsr1.benchmarks.common import cpu_model, write_report

#: one decoder layer of tiny-125m, (out, in): fused qkv, o, fused gate/up, down; 12 of them, then the head.
LAYER = [(1280, 768), (768, 768), (4096, 768), (768, 2048)]
HEAD = (32000, 768)


def interleaved_medians(fns: dict[str, Any], reps: int, flush: Any | None) -> dict[str, float]:
    """Median ms of each function; every repetition runs all of them in turn, so drift hits each alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            if flush is not None:
                flush.sum()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.cpu_linear_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,64,512")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    from dsr1.hugepages import enable_huge_pages

    enable_huge_pages()  # before torch is imported: huge-page allocations on, as the CLI runs the engine
    import torch

    from dsr1.models import packing
    from dsr1_device_cpu import panels

    reason = panels.unavailable()
    if reason is not None:
        print(f"cpu_linear_kernels: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = LAYER * 12 + [HEAD]
    dense = [torch.randn(o, i) * 0.02 for o, i in shapes]
    kn = [w.t().contiguous().t() for w in dense]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, packing.PACK_ROWS) for w in dense]  # one block each
    panel = [panels.pack_linear(_as_linear(w)) for w in dense]
    del dense
    flush = torch.randn(60_000_000)  # 240 MB
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in {i for _, i in shapes}}
        cold = flush if rows <= 16 else None
        reps = args.reps if rows <= 64 else 3
        row: dict[str, Any] = {"rows": rows, "weights_from": "dram" if cold is not None else "cache, back to back"}
        row.update(interleaved_medians({
            "mkl_kn": lambda xs=xs: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in kn],
            "onednn_packed": lambda xs=xs: [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "") for w in onednn],
            "panels": lambda xs=xs: [m(xs[m.in_features]) for m in panel],
        }, reps, cold))
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {
        "command": " ".join(["python", "-m", "dsr1.benchmarks.cpu_linear_kernels",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "weight_bytes": sum(o * i * 4 for o, i in shapes),
        "results": results,
    }
    write_report(report, args.output)
    return 0


def _as_linear(weight: Any) -> Any:
    import torch

    with torch.device("meta"):
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


if __name__ == "__main__":
    raise SystemExit(main())

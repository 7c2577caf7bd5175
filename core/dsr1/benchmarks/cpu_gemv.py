"""The SDK's CPU GEMV against the torch path it replaces, on tiny-125m's linear layers (issue 16).

    python -m dsr1.benchmarks.cpu_gemv --rows 1,8 --output bench/results/cpu-gemv/cpu-gemv.json

For each weight format and row count, each layer shape of one tiny-125m forward (12 copies of the
decoder layer's fused qkv, o, fused gate/up and down, then the lm_head; distinct weights, so each call
reads its weight from DRAM, and a 64 MB read between shapes evicts the last one from the L3 cache) is
timed with:

* ``old``: what the plugins ran before the kernel: ``int8``: ``aten._weight_int8pack_mm`` (bf16
  activations and scales, the int8 plugin's default ``compute_dtype``); ``w8a8``: the w8a8 plugin's torch
  formulation (per-token quantization, ``torch._int_mm``, two rescales; fp32 scales); ``bf16``/``fp16``/``fp32``:
  ``F.linear`` in that dtype;
* ``gemv``: :func:`dsr1_sdk.kernels.cpu.gemv` on the path ``auto`` picks here (activations in the same
  dtype as ``old``, converted to fp32 by the wrapper, the result converted back);
* ``gemv_<path>`` for each other path named in ``--paths`` (``avx2`` shows what an AVX2-only CI machine runs).

Median and best of ``--reps`` repetitions, each running every column in turn (drift hits each alike;
on a machine shared with other work the best is the closer estimate of the kernel, the median of what
a run meets). ``GB/s`` is the weight (and scale) bytes a call must read over its best time, beside
``stream_gbs``: all threads reading 480 MiB with :func:`~dsr1_sdk.kernels.cpu.stream_read` (best of 5),
the fastest plain read of this machine.
Every kernel's result is checked against the dequantized weight's fp64 product (max relative error).
Other processes share this machine: ``load_avg`` and ``others_busy_pct`` say how much.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from dsr1.benchmarks.common import cpu_busy, environment, others_busy, write_report
from dsr1.benchmarks.cpu_linear_kernels import HEAD, LAYER

#: layer name → ((out, in), calls per forward)
SHAPES = {"qkv": (LAYER[0], 12), "o": (LAYER[1], 12), "gate_up": (LAYER[2], 12), "down": (LAYER[3], 12),
          "lm_head": (HEAD, 1)}
FLUSH_BYTES = 64 * 2**20


def _weights(fmt: str, n: int, k: int, copies: int, seed: int) -> list[tuple[Any, Any]]:
    """``copies`` (weight, scales) pairs of one shape in ``fmt`` (random, std 0.02; int8 per-channel quantized)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, generator=g) * 0.02
        if fmt in ("int8", "w8a8"):
            # (N,) as the int8 plugin keeps them (bf16), or w8a8 (fp32)
            s = (w.abs().amax(1) / 127).to(torch.bfloat16 if fmt == "int8" else torch.float32)
            q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
            out.append((q, s))
        else:
            out.append((w.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt]), None))
    return out


def _timings(fns: dict[str, Any], reps: int, flush: Any) -> dict[str, tuple[float, float]]:
    """(median, best) seconds of each function; every repetition runs all of them in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            flush()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.cpu_gemv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--formats", default="int8,w8a8,bf16,fp16,fp32")
    p.add_argument("--paths", default="avx2", help="forced paths timed besides auto (comma-separated, may be empty)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own count)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from dsr1_sdk.kernels import cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    reason = cpu.unavailable()
    if reason is not None:
        print(f"cpu_gemv: {reason}", file=sys.stderr)
        return 2
    extra = [x for x in args.paths.split(",") if x and x in cpu.paths()]
    big = torch.empty(480 * 2**20, dtype=torch.uint8).random_()
    stream = []
    for _ in range(5):
        t = time.perf_counter()
        cpu.stream_read(big)
        stream.append(time.perf_counter() - t)
    stream_gbs = round(big.numel() / min(stream) / 1e9, 2)
    del big
    flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8).random_()

    def flush() -> None:
        cpu.stream_read(flush_buf)

    dtypes = {"int8": torch.bfloat16, "w8a8": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp32": torch.float32}
    busy0, load0 = cpu_busy(), os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    for fmt in args.formats.split(","):
        for seed, (layer, ((n, k), calls)) in enumerate(SHAPES.items()):
            ws = _weights(fmt, n, k, calls, seed)
            nbytes = sum(w.nbytes + (0 if s is None else s.nbytes) for w, s in ws)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtypes[fmt])
                if fmt == "int8":
                    def old(ws: Any = ws, x: Any = x) -> None:
                        for q, s in ws:
                            torch.ops.aten._weight_int8pack_mm(x, q, s)
                elif fmt == "w8a8":
                    from dsr1_quant_w8a8 import w8a8_torch  # the plugin's own torch formulation

                    def old(ws: Any = ws, x: Any = x) -> None:
                        for q, s in ws:
                            w8a8_torch(x, q, s)
                else:
                    def old(ws: Any = ws, x: Any = x) -> None:
                        for w, _ in ws:
                            F.linear(x, w)

                def new(ws: Any = ws, x: Any = x, path: str = "auto") -> None:
                    for w, s in ws:
                        cpu.gemv(x, fmt, w, s, path=path)

                fns = {"old": old, "gemv": new, **{f"gemv_{pth}": (lambda pth=pth: new(path=pth)) for pth in extra}}
                med = _timings(fns, args.reps, flush)
                w0, s0 = ws[0]
                want = F.linear(x.double(), w0.double() * (1 if s0 is None else s0.double()[:, None]))
                got_old = (torch.ops.aten._weight_int8pack_mm(x, w0, s0) if fmt == "int8" else
                           w8a8_torch(x, w0, s0) if fmt == "w8a8" else F.linear(x, w0))
                entry: dict[str, Any] = {"format": fmt, "layer": layer, "shape": [n, k], "calls": calls, "rows": rows,
                                         "bytes_per_forward": nbytes}
                for name, (sec, best) in med.items():
                    entry[f"{name}_ms"] = round(sec * 1e3, 3)
                    entry[f"{name}_best_ms"] = round(best * 1e3, 3)
                    entry[f"{name}_best_gbs"] = round(nbytes / best / 1e9, 2)
                for name, got in (("old", got_old), ("gemv", cpu.gemv(x, fmt, w0, s0))):
                    entry[f"{name}_max_rel_err"] = float((got.double() - want).abs().max() / want.abs().max())
                print(entry, flush=True)
                results.append(entry)
            del ws
    busy1 = cpu_busy()
    totals = []
    for fmt in args.formats.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            part = [e for e in results if e["format"] == fmt and e["rows"] == rows]
            nbytes = sum(e["bytes_per_forward"] for e in part)
            total: dict[str, Any] = {"format": fmt, "rows": rows, "bytes_per_forward": nbytes}
            for col in ["old", "gemv", *(f"gemv_{pth}" for pth in extra)]:
                total[f"{col}_ms"] = round(sum(e[f"{col}_ms"] for e in part), 2)
                best = sum(e[f"{col}_best_ms"] for e in part)
                total[f"{col}_best_ms"] = round(best, 2)
                total[f"{col}_best_gbs"] = round(nbytes / best / 1e6, 2)
                total[f"{col}_best_of_stream"] = round(nbytes / best / 1e6 / stream_gbs, 2)
            total["speedup_median"] = round(total["old_ms"] / total["gemv_ms"], 2)
            total["speedup_best"] = round(total["old_best_ms"] / total["gemv_best_ms"], 2)
            totals.append(total)
    env = environment("cpu")
    env["machine"].update({"capability": torch.backends.cpu.get_cpu_capability(), "gemv_paths": list(cpu.paths()),
                           "load_avg_1m_start": load0, "others_busy_pct": others_busy(busy0, busy1)})
    report = {"command": " ".join(["python", "-m", "dsr1.benchmarks.cpu_gemv",
                                   *(sys.argv[1:] if argv is None else argv)]),
              **env, "stream_gbs": stream_gbs, "forward_totals": totals, "results": results}
    print(write_report({k: v for k, v in report.items() if k != "results"}, None))
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

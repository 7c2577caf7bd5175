"""Issue 16 probe: does programmatic dependent launch (PDL) shorten a captured bf16 decode step on Hopper?

Qwen2-7B-shaped layers (28 × norm → qkv GEMV → elementwise → o GEMV → norm → gate_up GEMV → elementwise →
down GEMV), distinct weights per layer, captured in one CUDA graph. Variants:
  off      plain launches;
  wait     GEMVs launched with launch_pdl, gdc_wait first thing (the elementwise kernels do not trigger);
  prefetch as wait, the first weight tile loaded before gdc_wait;
  trigger  prefetch, and the elementwise kernels call gdc_launch_dependents first thing.

    python -m dsr1.benchmarks.pdl_probe --output bench/results/kernels16/pdl-probe-h200.json

``tb_s`` is the weight bytes over the median replay; ``read_floor_ms`` a plain ``sum`` over as many bytes.
Only on CUDA with compute capability 9.0 or newer (PDL), with triton.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

#: Qwen2-7B: hidden, intermediate, fused q/k/v outputs, layers
HIDDEN, INTER, QKV, LAYERS = 3584, 18944, 4608, 28


def _elapsed_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn`` between two CUDA events (the queue is idle before: the caller synchronized)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.pdl_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("pdl_probe: needs a CUDA GPU of compute capability 9.0 or newer (programmatic dependent launch); "
              "run it on an H100/H200", file=sys.stderr)
        return 2
    import triton

    from dsr1.benchmarks.pdl_kernels import gemv, norm

    dev = "cuda"
    torch.manual_seed(0)
    layers = [{"qkv": torch.randn(QKV, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02,
               "o": torch.randn(HIDDEN, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02,
               "gu": torch.randn(2 * INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02,
               "down": torch.randn(HIDDEN, INTER, device=dev, dtype=torch.bfloat16) * 0.02} for _ in range(LAYERS)]
    nbytes = sum(t.nbytes for lay in layers for t in lay.values())
    g = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    bufs = {n: torch.randn(n, device=dev, dtype=torch.bfloat16) for n in (HIDDEN, QKV, 2 * INTER, INTER)}
    xh = torch.randn(HIDDEN, device=dev, dtype=torch.bfloat16)

    def run(gdc: bool, prefetch: bool, trigger: bool) -> None:
        def mv(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bn: int) -> None:
            n, k = w.shape
            extra = {"launch_pdl": True} if gdc else {}
            gemv[(n // bn,)](w, x, y, n, k, BLOCK_N=bn, BLOCK_K=512, GDC=gdc, PREFETCH=prefetch, num_warps=4,
                             num_stages=1, **extra)

        def nm(x: torch.Tensor, y: torch.Tensor, n: int) -> None:
            norm[(1,)](x, g, y, n, BLOCK=triton.next_power_of_2(n), TRIGGER=trigger, num_warps=8)
        for lay in layers:
            nm(xh, bufs[HIDDEN], HIDDEN)
            mv(lay["qkv"], bufs[HIDDEN], bufs[QKV], 1)
            nm(bufs[QKV], bufs[HIDDEN], HIDDEN)
            mv(lay["o"], bufs[HIDDEN], xh, 1)
            nm(xh, bufs[HIDDEN], HIDDEN)
            mv(lay["gu"], bufs[HIDDEN], bufs[2 * INTER], 1)
            nm(bufs[2 * INTER], bufs[INTER], INTER)
            mv(lay["down"], bufs[INTER], xh, 1)

    variants = {"off": (False, False, False), "wait": (True, False, False), "prefetch": (True, True, False),
                "trigger": (True, True, True)}
    graphs, out = {}, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "weight_bytes": nbytes}
    for name, v in variants.items():
        try:
            for _ in range(2):
                run(*v)
            torch.cuda.synchronize()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                run(*v)
            graphs[name] = gr
        except Exception as err:  # noqa: BLE001  # a variant this triton cannot launch is reported, not fatal
            out[name] = f"failed: {type(err).__name__}: {str(err)[:300]}"
    big = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    times = {k: [] for k in graphs}
    for _ in range(15):
        for name, gr in graphs.items():
            big.zero_()  # evict L2
            torch.cuda.synchronize()
            times[name].append(_elapsed_ms(gr.replay))
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_ms": round(ts[len(ts) // 2], 4), "best_ms": round(ts[0], 4),
                     "tb_s": round(nbytes / (ts[len(ts) // 2] * 1e-3) / 1e12, 3)}
    # the read floor in this process: a copy-free read of the same bytes
    flat = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16).normal_()
    rt = []
    for _ in range(10):
        big.zero_()  # evict L2
        torch.cuda.synchronize()
        rt.append(_elapsed_ms(flat.sum))
    out["read_floor_ms"] = round(min(rt), 4)
    out["command"] = "python -m dsr1.benchmarks.pdl_probe" + (f" --output {args.output}" if args.output else "")
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:  # dsr1.output_files needs nothing beyond the standard library (this probe runs without deps)
        from dsr1.output_files import write_json

        write_json(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

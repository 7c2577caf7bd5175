"""CPU matmul kernels behind the quant plugins, one linear layer at a time (125M shapes).

For each (out, in) weight of the tiny-125m shape and each row count M, the median time of:
bf16 ``F.linear``; int8 weight-only via ``aten._weight_int8pack_mm`` and via dequantize + bf16
GEMM; int4 (g64) via ``aten._weight_int4pack_mm_for_cpu``; w8a8 via ``torch._int_mm`` with
per-token activation quantization; and torchao 0.18's ``Int8WeightOnlyConfig`` when torchao
imports (install it into a side dir: ``pip install --no-deps --target /tmp/ao torchao==0.18.0``
and put that dir on ``PYTHONPATH``; it is not a dependency of any plugin).

    python -m dsr1.benchmarks.quant_kernels_cpu --output bench/results/quant-kernels-cpu.json
"""
# ruff: noqa: B023 - each lambda made in a loop is timed within the same iteration
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dsr1.benchmarks.common import cpu_model, write_report


def median_us(fns: dict[str, Callable[[], Any]], rounds: int = 7, inner: int = 5) -> dict[str, float]:
    """Interleaved rounds (each function once per round), median microseconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - start) / inner * 1e6)
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def torchao_linear(weight: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as err:  # noqa: BLE001 - any import failure is the recorded reason
        return None, f"torchao does not import: {type(err).__name__}: {err}"
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    layer.weight.data.copy_(weight)
    layer = copy.deepcopy(layer)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer, f"torchao {torchao.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.quant_kernels_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,8,16,64,512")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    ao_note = ""
    for out_f, in_f in ((2048, 768), (768, 2048)):
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16()
        wf = w.float()
        scale = wf.abs().amax(1) / 127
        q8 = torch.round(wf / scale[:, None]).to(torch.int8)
        s8 = scale.bfloat16()
        g = 64
        grp = wf.view(out_f, in_f // g, g)
        lo, hi = grp.amin(-1), grp.amax(-1)
        s4 = ((hi - lo) / 15).clamp_min(1e-8)
        q4 = torch.round((grp - lo[..., None]) / s4[..., None]).clamp(0, 15).to(torch.int32).view(out_f, in_f)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        sz = torch.stack([s4.t(), (lo + 8 * s4).t()], -1).contiguous().bfloat16()  # (G, out, 2)
        ao, ao_note = torchao_linear(w)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, in_f, generator=gen).bfloat16()

            def w8a8() -> torch.Tensor:
                xs = x.float().abs().amax(-1, keepdim=True) / 127
                xq = torch.round(x.float() / xs).to(torch.int8)
                return (torch._int_mm(xq, q8.t()).float() * xs * scale).bfloat16()

            fns: dict[str, Callable[[], Any]] = {
                "bf16 F.linear": lambda: F.linear(x, w),
                "int8 aten._weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                "int8 dequantize + bf16 GEMM": lambda: F.linear(x, q8.to(torch.bfloat16)) * s8,
                "int4 g64 aten._weight_int4pack_mm_for_cpu": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, packed, g, sz),
                "w8a8 torch._int_mm": w8a8,
            }
            if ao is not None:
                fns["int8 torchao Int8WeightOnlyConfig (eager)"] = lambda: ao(x)
            with torch.inference_mode():
                got = median_us(fns)
            results.append({"weight": [out_f, in_f], "rows": m, "us": got})
            print(out_f, in_f, m, got, flush=True)
    report = {
        "command": "python -m dsr1.benchmarks.quant_kernels_cpu --output " + args.output,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
        "torchao": ao_note, "results": results,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""int8 weight-only matmul kernels on CUDA at decode sizes (issue 6), one process, same weights.

    python -m dsr1.benchmarks.int8_kernels --rows 1,8,16,32,64 --output OUT.json

For each Qwen2-7B linear shape and M rows, timed as a CUDA graph of 20 calls (device time, what a
captured decode step pays; :func:`~dsr1.benchmarks.cuda_timing.graph_ms`):

* ``bf16``: ``F.linear`` with the bf16 weight (the baseline);
* ``dequant``: ``F.linear(x, qweight.to(bf16)) * scales`` (the int8 plugin's ``cuda_kernel: dequant``);
* ``int8pack``: ``aten._weight_int8pack_mm`` (``cuda_kernel: int8pack``; rows ≤ 12);
* ``triton``: the int8 plugin's Triton kernels (``cuda_kernel: triton``, the default: the SDK's
  :mod:`dsr1_sdk.kernels.weight_only`, shared with int4 and fp8; ``weight_kernels`` times all three);
* ``torchao``: torchao's ``Int8WeightOnlyConfig`` on an ``nn.Linear``, compiled by ``torch.compile``
  (rows in ``--torchao-rows``; skipped with the reason when torchao does not import).

The ``bf16`` and ``triton`` columns cycle through copies of the weight (at least 256 MB of them), so
each call reads its weight from HBM as a decode step does, not from the 60 MB L2 cache; the other
columns reuse one weight (small layers partly hit L2: optimistic). Every int8 result is checked against
the dequantized weight's product (max relative error). The bandwidth column is the bytes each kernel
must read (weight, scales, x) over its time. CUDA only.
"""
# ruff: noqa: B023 - each lambda made in a loop is timed within the same iteration
from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from dsr1.benchmarks.cuda_timing import (
    QWEN2_7B_LINEARS,
    QWEN2_7B_LM_HEAD,
    error_line,
    graph_ms,
    kernel_report,
    require_cuda,
)

SHAPES = {**QWEN2_7B_LINEARS, "lm_head": QWEN2_7B_LM_HEAD}

#: bytes of weight copies a cycled timing walks through (well above the H200's 60 MB L2).
COLD_BYTES = 256 * 2**20


def cycled(fn: Any, weights: list[Any]) -> Any:
    """``fn(w)`` on the next of ``weights`` at each call (each captured call reads a different copy)."""
    it = itertools.cycle(weights)
    return lambda: fn(next(it))


def copies(t: Any) -> list[Any]:
    return [t] + [t.clone() for _ in range(-(-COLD_BYTES // (t.numel() * t.element_size())) - 1)]


def rel_err(y: Any, want: Any) -> float:
    return float((y.float() - want).abs().max() / want.abs().max())


def torchao_linear(w: Any) -> Any:
    """A compiled bf16 ``nn.Linear`` holding ``w``, quantized by torchao's int8 weight-only config."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    model = torch.nn.Sequential(linear)
    quantize_(model, Int8WeightOnlyConfig())
    return torch.compile(model, dynamic=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.int8_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--torchao-rows", default="1,8")
    p.add_argument("--output")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch
    import torch.nn.functional as F

    from dsr1_sdk.kernels import weight_only

    ao_rows = {int(x) for x in args.torchao_rows.split(",") if x}
    rows = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        scales = (w.abs().amax(1) / 127).to(torch.bfloat16)  # (N,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
        wb = w.to(torch.bfloat16)
        wb_copies, q_copies = copies(wb), copies(q)
        ao = None
        for m in [int(x) for x in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            want = F.linear(x.float(), q.float() * scales.float()[:, None])
            entry: dict[str, Any] = {"layer": name, "shape": [n, k], "rows": m,
                                     "bf16_ms": graph_ms(cycled(lambda w_: F.linear(x, w_), wb_copies)),
                                     "dequant_ms": graph_ms(lambda: F.linear(x, q.to(torch.bfloat16)) * scales)}
            try:
                entry["triton_max_rel_err"] = rel_err(weight_only.weight_only_mm(x, "int8", q, scales, None, 0), want)
                entry["triton_ms"] = graph_ms(
                    cycled(lambda q_: weight_only.weight_only_mm(x, "int8", q_, scales, None, 0), q_copies))
                entry["triton_config"] = weight_only.tuned_config(m)
            except Exception as err:  # noqa: BLE001 - report the kernel's failure, keep timing the others
                entry["triton_error"] = error_line(err)
            if m <= 12:
                try:
                    entry["int8pack_max_rel_err"] = rel_err(torch.ops.aten._weight_int8pack_mm(x, q, scales), want)
                    entry["int8pack_ms"] = graph_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scales))
                except RuntimeError as err:
                    entry["int8pack_error"] = str(err).splitlines()[0]
            if m in ao_rows:
                try:
                    ao = ao if ao is not None else torchao_linear(wb)
                    entry["torchao_max_rel_err"] = rel_err(ao(x), want)
                    entry["torchao_ms"] = graph_ms(lambda: ao(x))
                except Exception as err:  # noqa: BLE001
                    entry["torchao_error"] = error_line(err)
            int8_bytes, bf16_bytes = n * k + 2 * n + 2 * m * k, 2 * n * k + 2 * m * k
            entry["bf16_gbs"] = round(bf16_bytes / entry["bf16_ms"] / 1e6, 1)
            if "triton_ms" in entry:
                entry["triton_gbs"] = round(int8_bytes / entry["triton_ms"] / 1e6, 1)
                entry["triton_vs_bf16"] = round(entry["bf16_ms"] / entry["triton_ms"], 3)
            rows.append(entry)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in entry.items()}),
                  flush=True)
        del wb_copies, q_copies
    kernel_report(f"python -m dsr1.benchmarks.int8_kernels --rows {args.rows} --torchao-rows {args.torchao_rows}",
                  rows, args.output,
                  timing="CUDA graph of 20 calls, median of 20 replays, per call; bf16 and triton cycle weight copies "
                         "(HBM reads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

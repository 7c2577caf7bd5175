"""Weight-only matmul kernels on CUDA at decode sizes (issue 16), one process: per Qwen2-7B layer shape and rows,
bf16 cuBLAS against each weight format's previous CUDA path and the SDK's Triton kernels.

    python -m dsr1.benchmarks.weight_kernels --rows 1,8 --output OUT.json

Columns, each timed as a CUDA graph of 20 calls (:func:`~dsr1.benchmarks.cuda_timing.graph_ms`) cycling through
copies of its weight (at least 256 MB of them, so every call reads HBM as a decode step does, not the 60 MB L2):

* ``bf16``: ``F.linear`` with the bf16 weight (the baseline), and ``bf16_triton``: the SDK's GEMV on the same
  weight (one row only: can a GEMV beat cuBLAS on the small layers?);
* ``int8_triton``: :func:`dsr1_sdk.kernels.weight_only.weight_only_mm` on int8 per channel (the int8 plugin's
  ``cuda_kernel: triton``; its previous kernels are in ``bench/results/quant-h200/session3/run4``);
* ``int4_tinygemm`` / ``int4_triton``: torch's ``_weight_int4pack_mm`` (the int4 plugin's ``cuda_kernel:
  tinygemm``) and the SDK kernel on group-wise int4 (``--group``);
* ``fp8_scaled_mm`` / ``fp8_triton``: the fp8 plugin's ``torch._scaled_mm`` path (e4m3 activations) and the
  SDK kernel weight-only (bf16 activations).

Every quantized result is checked against its dequantized weight's product (max relative error); the bandwidth
column is the bytes each kernel must read (weight, scales, zeros, x) over its time; ``vs_bf16`` is bf16's time
over the kernel's. ``per_token`` sums each column over one decode step's weight calls (28 layers of qkv, o,
gate_up, down, and the head) at each row count. CUDA only; needs the int4 and fp8 plugins for their columns.
"""
# ruff: noqa: B023 - each lambda made in a loop is timed within the same iteration
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from dsr1.benchmarks.cuda_timing import (
    QWEN2_7B_LINEARS,
    QWEN2_7B_LM_HEAD,
    error_line,
    graph_ms,
    kernel_report,
    require_cuda,
)
from dsr1.benchmarks.int8_kernels import COLD_BYTES, rel_err

SHAPES = {**QWEN2_7B_LINEARS, "lm_head": QWEN2_7B_LM_HEAD}
#: calls of each shape in one Qwen2-7B decode step.
CALLS_PER_TOKEN = {"qkv_proj": 28, "o_proj": 28, "gate_up_proj": 28, "down_proj": 28, "lm_head": 1}


def cold_copies(tensors: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``tensors`` and clones of them (None stays None), together at least :data:`COLD_BYTES`."""
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    extra = -(-COLD_BYTES // size) - 1
    return [tensors] + [tuple(None if t is None else t.clone() for t in tensors) for _ in range(extra)]


def cycled_ms(fn: Callable[..., Any], operands: list[tuple[Any, ...]]) -> float:
    """:func:`graph_ms` of ``fn(*operands[i])``, each captured call on the next copy."""
    state = {"i": 0}

    def call() -> Any:
        ops = operands[state["i"] % len(operands)]
        state["i"] += 1
        return fn(*ops)

    return graph_ms(call)


class Format:
    """One weight format's operands for a layer: how to make them, read bytes, the reference and the paths."""

    def __init__(self, name: str, group: int) -> None:
        self.name, self.group = name, group

    def quantize(self, w: Any) -> tuple[tuple[Any, ...], Any]:
        """``(operands of the Triton kernel: weight, scales, zeros), dequantized fp32 weight``."""
        import torch

        from dsr1.quantization.schemes import (
            fp8_dequantize,
            fp8_per_channel,
            int4_dequantize,
            int4_groupwise,
            int8_dequantize,
            int8_per_channel,
            pack_nibbles,
        )

        if self.name == "int8":
            q, s = int8_per_channel(w, torch.bfloat16)
            return (q, s, None), int8_dequantize(q, s)
        if self.name == "int4":
            q, s, z = int4_groupwise(w, self.group, torch.bfloat16)
            return (pack_nibbles(q), s, z), int4_dequantize(q, s, z, self.group)
        if self.name == "fp8":
            q, s = fp8_per_channel(w)
            return (q.view(torch.uint8), s, None), fp8_dequantize(q, s)
        wb = w.to(torch.bfloat16)
        return (wb, None, None), wb.float()

    def bytes(self, n: int, k: int, m: int) -> int:
        x = 2 * m * k
        return x + {"int8": n * k + 2 * n, "int4": n * k // 2 + 4 * n * (k // self.group), "fp8": n * k + 4 * n,
                    "bf16": 2 * n * k}[self.name]

    def old(self, operands: tuple[Any, ...]) -> tuple[str, tuple[Any, ...], Callable[..., Any]] | None:
        """The format's previous CUDA path: (column name, its operands, fn(x, *operands)), or None."""
        import torch

        if self.name == "int4":
            from dsr1_quant_int4 import kernels

            q_packed, s, z = operands
            from dsr1.quantization.schemes import unpack_nibbles

            packed = kernels.pack(unpack_nibbles(q_packed), q_packed.device)
            sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()  # (G, N, 2)
            return "tinygemm", (packed, sz), lambda x, p, sz_: kernels.matmul(x, p, self.group, sz_)
        if self.name == "fp8":
            from dsr1_quant_fp8 import fp8_linear

            q, s, _ = operands
            return "scaled_mm", (q.view(torch.float8_e4m3fn), s), fp8_linear
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.weight_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--formats", default="int8,int4,fp8,bf16", help="of int8, int4, fp8, bf16 (bf16: one row only)")
    p.add_argument("--group", type=int, default=64, help="int4 group size (the int4 plugin's default)")
    p.add_argument("--layers", default=",".join(SHAPES))
    p.add_argument("--output")
    args = p.parse_args(argv)
    require_cuda(p.prog)
    import torch
    import torch.nn.functional as F

    from dsr1_sdk.kernels import weight_only

    formats = [Format(f, args.group) for f in args.formats.split(",") if f]
    all_rows = [int(x) for x in args.rows.split(",")]
    results: list[dict[str, Any]] = []
    for name in args.layers.split(","):
        n, k = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        wb_copies = cold_copies((w.to(torch.bfloat16),))
        quantized = {f.name: f.quantize(w) for f in formats}
        del w
        for m in all_rows:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            entry: dict[str, Any] = {"layer": name, "shape": [n, k], "rows": m,
                                     "bf16_ms": cycled_ms(lambda w_: F.linear(x, w_), wb_copies)}
            entry["bf16_gbs"] = round((2 * n * k + 2 * m * k) / entry["bf16_ms"] / 1e6, 1)
            for f in formats:
                if f.name == "bf16" and m > 1:
                    continue  # cuBLAS is the bf16 kernel at several rows
                operands, deq = quantized[f.name]
                want = F.linear(x.float(), deq)
                columns: list[tuple[str, tuple[Any, ...], Callable[..., Any]]] = [
                    ("triton", operands, lambda x_, w_, s_, z_: weight_only.weight_only_mm(x_, f.name, w_, s_, z_,
                                                                                            f.group))]
                try:
                    old = f.old(operands)
                except Exception as err:  # noqa: BLE001 - report the old path's failure, keep timing the others
                    entry[f"{f.name}_old_error"] = error_line(err)
                    old = None
                if old is not None:
                    columns.append(old)
                for col, ops, fn in columns:
                    key = f"{f.name}_{col}"
                    try:
                        entry[f"{key}_max_rel_err"] = round(rel_err(fn(x, *ops), want), 5)
                        copies = cold_copies(ops)
                        entry[f"{key}_ms"] = cycled_ms(lambda *o: fn(x, *o), copies)
                        del copies
                        entry[f"{key}_gbs"] = round(f.bytes(n, k, m) / entry[f"{key}_ms"] / 1e6, 1)
                        entry[f"{key}_vs_bf16"] = round(entry["bf16_ms"] / entry[f"{key}_ms"], 3)
                        if col == "triton":
                            entry[f"{key}_config"] = weight_only.tuned_config(m)
                    except Exception as err:  # noqa: BLE001 - report the kernel's failure, keep timing the others
                        entry[f"{key}_error"] = error_line(err)
            results.append(entry)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in entry.items()}),
                  flush=True)
        del wb_copies, quantized
        torch.cuda.empty_cache()
    per_token = per_token_ms(results, all_rows)
    print(json.dumps({"per_token_ms": per_token}), flush=True)
    kernel_report(f"python -m dsr1.benchmarks.weight_kernels --rows {args.rows} --formats {args.formats} "
                  f"--group {args.group} --layers {args.layers}", results, args.output,
                  timing="CUDA graph of 20 calls, median of 20 replays, per call; every column cycles copies of its "
                         "operands (>= 256 MB: HBM reads)",
                  per_token_ms=per_token)
    return 0


def per_token_ms(results: list[dict[str, Any]], rows: list[int]) -> dict[str, dict[str, float]]:
    """Per row count, each ``*_ms`` column summed over one decode step's calls (only columns every layer has)."""
    out: dict[str, dict[str, float]] = {}
    for m in rows:
        entries = [e for e in results if e["rows"] == m]
        if {e["layer"] for e in entries} != set(CALLS_PER_TOKEN):
            continue  # a partial run: no whole step to sum
        cols = set.intersection(*({c for c in e if c.endswith("_ms")} for e in entries))
        out[str(m)] = {c[:-3]: round(sum(e[c] * CALLS_PER_TOKEN[e["layer"]] for e in entries), 4)
                       for c in sorted(cols)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""int8 weight-only matmul kernels on CUDA at decode sizes (issue 6), one process, same weights.

    python bench/h200_int8.py --output OUT.json

For each Qwen2-7B linear shape and M rows: bf16 ``F.linear`` (the baseline), the int8 plugin's
default CUDA path (``F.linear(x, qweight.to(bf16)) * scales``) and ``aten._weight_int8pack_mm``
(reads the int8 weight directly). CUDA events, median of 50 after 10 warm-ups; the int8 results
are checked against the dequantized weight's product.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cuda_timing import QWEN2_7B_LINEARS, QWEN2_7B_LM_HEAD, median_ms  # bench/cuda_timing.py, a sibling module

SHAPES = {**QWEN2_7B_LINEARS, "lm_head": QWEN2_7B_LM_HEAD}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,8")
    p.add_argument("--output")
    args = p.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        scales = (w.abs().amax(1) / 127).to(torch.bfloat16)  # (N,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
        wb = w.to(torch.bfloat16)
        for m in [int(x) for x in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            entry = {"layer": name, "shape": [n, k], "rows": m,
                     "bf16_ms": median_ms(lambda: F.linear(x, wb)),
                     "dequant_ms": median_ms(lambda: F.linear(x, q.to(torch.bfloat16)) * scales)}
            try:
                y = torch.ops.aten._weight_int8pack_mm(x, q, scales)
                want = F.linear(x.float(), q.float() * scales.float()[:, None])
                entry["int8pack_max_rel_err"] = float((y.float() - want).abs().max() / want.abs().max())
                entry["int8pack_ms"] = median_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scales))
            except RuntimeError as err:
                entry["int8pack_error"] = str(err).splitlines()[0]
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    report = {"command": "python bench/h200_int8.py --rows " + args.rows,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

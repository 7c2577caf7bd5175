"""What the single-kernel H200 scripts (``h200_int8.py``, ``h200_semi24.py``) share: the Qwen2-7B
linear shapes and a CUDA-event timer. Imported as a sibling module (``python bench/<script>.py``)."""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

#: Qwen2-7B's linear layers as dsr1 runs them (q/k/v and gate/up fused), ``(out, in)``.
QWEN2_7B_LINEARS: dict[str, tuple[int, int]] = {
    "qkv_proj": (4608, 3584), "o_proj": (3584, 3584), "gate_up_proj": (37888, 3584), "down_proj": (3584, 18944),
}
QWEN2_7B_LM_HEAD: tuple[int, int] = (152064, 3584)


def median_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls timed with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

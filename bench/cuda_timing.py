"""What the single-kernel H200 scripts (``h200_int8.py``, ``h200_semi24.py``) share: the Qwen2-7B
linear shapes and two CUDA-event timers. Imported as a sibling module (``python bench/<script>.py``).

:func:`median_ms` times eager calls, so a call whose host-side work (Python dispatch, plan set-up)
takes longer than its kernels is timed at the host's pace. :func:`graph_ms` captures the calls in
a CUDA graph and times replays: the device time alone, which is what a captured decode step pays.
"""
from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable
from typing import Any

import torch

from dsr1.benchmarks import common

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


def graph_ms(fn: Callable[[], object], calls: int = 20, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per ``fn()`` when ``calls`` of them are captured in one CUDA graph and replayed.

    Raises what capture raises (a kernel that cannot be captured).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, warmup=2, reps=reps) / calls


def write_report(command: str, rows: list[dict[str, Any]], output: str | None, **extra: Any) -> None:
    """The script's JSON (command, date, GPU, torch version, ``extra``, results) to ``output`` when given."""
    report = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, **extra, "results": rows}
    common.write_report(report, output)


def error_line(err: BaseException) -> str:
    """``err`` as one line for a report: its type and the first line of its message."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"

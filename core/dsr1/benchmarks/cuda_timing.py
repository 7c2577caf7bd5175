"""CUDA timers every GPU benchmark shares, and the Qwen2-7B linear shapes the kernel benchmarks time.

:func:`median_ms` times eager calls with CUDA events, so a call whose host-side work (Python
dispatch, plan set-up) takes longer than its kernels is timed at the host's pace. :func:`graph_ms`
captures the calls in a CUDA graph and times replays: the device time alone, which is what a
captured decode step pays. :func:`decode_rate` times whole ``generate``-like calls (1 token and N
tokens, alternating) and turns them into tok/s by the protocol of :mod:`dsr1.benchmarks.rates`.
"""
from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from typing import Any

from dsr1.benchmarks import common
from dsr1.benchmarks.rates import rates

#: Qwen2-7B's linear layers as dsr1 runs them (q/k/v and gate/up fused), ``(out, in)``.
QWEN2_7B_LINEARS: dict[str, tuple[int, int]] = {
    "qkv_proj": (4608, 3584), "o_proj": (3584, 3584), "gate_up_proj": (37888, 3584), "down_proj": (3584, 18944),
}
QWEN2_7B_LM_HEAD: tuple[int, int] = (152064, 3584)


def sync_time() -> float:
    """``time.perf_counter()`` after the device finished its queued work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def median_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls timed with CUDA events, after ``warmup`` calls."""
    import torch

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
    import torch

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


def decode_rate(what: str, generate: Callable[[int], object], batch: int, prompt: int, new: int,
                reps: int = 3) -> dict[str, float]:
    """Rates of ``generate(n)`` (``n`` new tokens for ``batch`` prompts of ``prompt`` tokens): ``reps``
    pairs of a 1-token and a ``new``-token call, medians (the caller warms up first)."""
    t1: list[float] = []
    tn: list[float] = []
    for _ in range(reps):
        for n, times in ((1, t1), (new, tn)):
            start = sync_time()
            generate(n)
            times.append(sync_time() - start)
    return rates(what, batch, prompt, new, t1, tn)


def kernel_report(command: str, rows: list[dict[str, Any]], output: str | None, **extra: Any) -> None:
    """A kernel benchmark's JSON (command, date, GPU, torch version, ``extra``, results) to ``output`` when given."""
    import torch

    report = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, **extra, "results": rows}
    common.write_report(report, output)


def error_line(err: BaseException) -> str:
    """``err`` as one line for a report: its type and the first line of its message."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def require_cuda(prog: str) -> None:
    """Exit with one line when this machine has no CUDA device (the module's ``--help`` still works)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{prog}: needs a CUDA device (torch.cuda.is_available() is False)")

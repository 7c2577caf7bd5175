"""The profiler's clocks and running statistics (:mod:`dsr1.monitor.profiler`): marks a sampled step
takes around each timed module, read back later, and a mean/variance kept without the samples."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


# --- clocks ------------------------------------------------------------------------------------


class HostClock:
    """Marks are ``now()`` floats (``perf_counter``), ready at once."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now

    def begin(self) -> None:
        pass

    def mark(self) -> Any:
        return self.now()

    def ready(self, mark: Any) -> bool:
        return True

    def wait(self, mark: Any) -> None:
        pass

    def seconds(self, start: Any, end: Any) -> float:
        return float(end - start)

    def release(self, marks: list[Any]) -> None:
        pass


class CudaClock:
    """Marks are CUDA events recorded on the step's stream; events are reused once read."""

    def __init__(self) -> None:
        self.free: list[torch.cuda.Event] = []
        self.stream: torch.cuda.Stream | None = None

    def begin(self) -> None:
        """At a sampled step's start: its stream, looked up once (``Event.record()`` without one looks up
        the current stream at every mark, which costs more than the record itself)."""
        self.stream = torch.cuda.current_stream()

    def mark(self) -> Any:
        event = self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def ready(self, mark: Any) -> bool:
        return bool(mark.query())

    def wait(self, mark: Any) -> None:
        mark.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1e3  # elapsed_time is in milliseconds

    def release(self, marks: list[Any]) -> None:
        self.free.extend(marks)


# --- statistics --------------------------------------------------------------------------------


@dataclass
class RunningStat:
    """Count, mean and population variance, updated one value at a time (Welford)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        d = x - self.mean
        self.mean += d / self.count
        self.m2 += d * (x - self.mean)

    def merge(self, other: RunningStat) -> None:
        """Fold in another stat's values (Chan et al.'s pairwise update)."""
        n = self.count + other.count
        if not other.count:
            return
        d = other.mean - self.mean
        self.m2 += other.m2 + d * d * self.count * other.count / n
        self.mean += d * other.count / n
        self.count = n

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0



"""The monitor kit: the builtin ``timing`` monitor passes it, monitors that break a contract fail it."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dsr1.interfaces import GenerationStats
from dsr1.monitor.timing import TimingMonitor
from dsr1_sdk.testing import MonitorConformance
from dsr1_sdk.testing.monitor import CASES, check_stats, check_stream, reference_stats


class TestTiming(MonitorConformance):
    plugin = "timing"


class ZeroForUnknown(TimingMonitor):
    """Reports 0 where it knows nothing (callers would print 0 s, 0 tok/s)."""

    def generation_stats(self) -> GenerationStats:
        got = super().generation_stats()
        return GenerationStats(*(0 if v is None else v for v in (got.prefill_s, got.decode_s, got.decode_tokens,
                                                                  got.decode_tok_s, got.kvcache_bytes)))


class NewestFirst(TimingMonitor):
    def stream(self) -> Iterator[dict[str, Any]]:
        return iter(list(reversed(self.events)))


class PeakBytes(TimingMonitor):
    """Reports the largest kvcache.bytes instead of the last one."""

    def generation_stats(self) -> GenerationStats:
        got = super().generation_stats()
        peak = max((e["bytes"] for e in self.events if e["event"] == "kvcache.bytes"), default=None)
        return GenerationStats(got.prefill_s, got.decode_s, got.decode_tokens, got.decode_tok_s, peak)


class OneShotStream(TimingMonitor):
    def stream(self) -> Iterator[dict[str, Any]]:
        events, self.events = self.events, []
        return iter(events)


def record(monitor: TimingMonitor, case: str) -> TimingMonitor:
    for name, values in CASES[case]:
        monitor.record(name, **values)
    return monitor


def test_reference_of_the_cases() -> None:
    assert reference_stats(CASES["two_generates"]) == GenerationStats(0.5, 2.5, 56, 56 / 2.5, 2048)
    assert reference_stats(CASES["engine_loop"]) == GenerationStats(0.2, 0.0, 0, None, None)
    assert reference_stats(CASES["prefill_only"]) == GenerationStats(prefill_s=0.05)


def test_broken_monitors_fail() -> None:
    with pytest.raises(AssertionError, match="the events say nothing about it"):
        check_stats(ZeroForUnknown().generation_stats(), GenerationStats(), False, "fresh")
    with pytest.raises(AssertionError, match="event 0 is"):
        check_stream(record(NewestFirst(), "one_generate"), CASES["one_generate"], "newest first")
    with pytest.raises(AssertionError, match="kvcache_bytes = 8192, reference 2048"):
        check_stats(record(PeakBytes(), "two_generates").generation_stats(), reference_stats(CASES["two_generates"]),
                    True, "peak")
    with pytest.raises(AssertionError, match="reading stream\\(\\) twice"):
        check_stream(record(OneShotStream(), "one_generate"), CASES["one_generate"], "one shot")

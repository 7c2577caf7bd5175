"""Builtin monitor ``timing``: spans, counters and byte gauges kept in plain Python lists.

The engine records a handful of events per ``generate`` call (never per token), so the
cost is a list append.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Monitor
from dsr1.specs import PluginSpec


class TimingMonitor(Monitor):
    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def record(self, event: str, **values: Any) -> None:
        self.events.append({"event": event, "time": time.time(), **values})

    def stream(self) -> Iterator[dict[str, Any]]:
        return iter(list(self.events))

    def clear(self) -> None:
        self.events.clear()

    def summary(self) -> dict[str, Any]:
        """Per event: ``count``, the sum of each numeric value, and the last value of gauges (``*.bytes``)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.events:
            s = out.setdefault(e["event"], {"count": 0})
            s["count"] += 1
            for k, v in e.items():
                if k in ("event", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if e["event"].endswith(".bytes"):
                    s[k] = v
                    s["peak_" + k] = max(s.get("peak_" + k, 0), v)
                else:
                    s[k] = s.get(k, 0) + v
        for name in ("prefill", "decode"):
            span = out.get(name)
            if span and span.get("seconds"):
                span["tokens_per_s"] = span.get("tokens", 0) / span["seconds"]
        return out


@hookimpl
def dsr1_monitor() -> PluginSpec:
    return PluginSpec(
        name="timing",
        family="monitor",
        impl=TimingMonitor,
        description="spans, counters and byte gauges in plain lists; summary() per event",
    )

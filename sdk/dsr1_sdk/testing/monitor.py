"""Monitor conformance: the record / summary / generation_stats / stream contracts.

The kit records the events the engine records (:data:`CASES`: ``prefill``, ``decode``,
``kvcache.bytes``, ``engine.step``, ``quant.switch``, in engine order) and checks against a
reference fold of the same events (:func:`reference_stats`, the semantics
:class:`dsr1.interfaces.GenerationStats` documents: summed ``prefill``/``decode`` seconds and
tokens, ``decode_tokens / decode_s``, the last ``kvcache.bytes``):

* ``generation_stats()`` is a ``GenerationStats``; every field is ``None`` (not kept) or the
  reference value; a fresh monitor reports every field ``None``, never 0; a monitor whose
  ``stream()`` has the events must report every field the events determine;
* ``stream()`` is empty (kept nothing) or exactly the recorded events, oldest first, each
  ``{"event": name, **values}`` (extra keys such as a timestamp allowed), and can be read twice;
* ``summary()`` is plain data (``json.dumps`` takes it) before and after recording;
* ``record()`` returns ``None``, accepts unknown event names and leaves the values it was given
  unchanged;
* recording never changes results: a tiny model generates the same tokens (greedy and seeded
  sampling) with this monitor as with the builtin ``timing``, and the monitor saw the run.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dsr1.interfaces import GenerationStats, Monitor
from dsr1_sdk.testing import tiny_runs
from dsr1_sdk.testing.base import PluginConformance

Event = tuple[str, dict[str, Any]]

#: Event sequences as the engine records them (per generate call, never per token).
CASES: dict[str, tuple[Event, ...]] = {
    "one_generate": (
        ("prefill", {"seconds": 0.25, "tokens": 14, "batch_size": 2}),
        ("decode", {"seconds": 1.5, "tokens": 30, "steps": 15, "batch_size": 2}),
        ("kvcache.bytes", {"bytes": 4096}),
    ),
    "two_generates": (
        ("prefill", {"seconds": 0.125, "tokens": 7, "batch_size": 1}),
        ("decode", {"seconds": 0.5, "tokens": 8, "steps": 8, "batch_size": 1}),
        ("kvcache.bytes", {"bytes": 8192}),
        ("prefill", {"seconds": 0.375, "tokens": 21, "batch_size": 3}),
        ("decode", {"seconds": 2.0, "tokens": 48, "steps": 16, "batch_size": 3}),
        ("kvcache.bytes", {"bytes": 2048}),
    ),
    "engine_loop": (
        ("engine.step", {"seconds": 0.01, "requests": 2}),
        ("quant.switch", {"to": "int8", "reason": "memory"}),
        ("prefill", {"seconds": 0.2, "tokens": 9, "batch_size": 1}),
        ("engine.step", {"seconds": 0.02, "requests": 1}),
        ("decode", {"seconds": 0.0, "tokens": 0, "steps": 0, "batch_size": 1}),
    ),
    "prefill_only": (("prefill", {"seconds": 0.05, "tokens": 3, "batch_size": 1}),),
}


def reference_stats(events: tuple[Event, ...]) -> GenerationStats:
    """The fold ``GenerationStats`` documents, computed directly from the events."""
    names = {name for name, _ in events}
    sums = {(n, k): sum(v[k] for name, v in events if name == n) for n in ("prefill", "decode")
            for k in ("seconds", "tokens")}
    kv = [v["bytes"] for name, v in events if name == "kvcache.bytes"]
    decode = "decode" in names
    return GenerationStats(
        prefill_s=sums[("prefill", "seconds")] if "prefill" in names else None,
        decode_s=sums[("decode", "seconds")] if decode else None,
        decode_tokens=int(sums[("decode", "tokens")]) if decode else None,
        decode_tok_s=(sums[("decode", "tokens")] / sums[("decode", "seconds")]
                      if decode and sums[("decode", "seconds")] else None),
        kvcache_bytes=kv[-1] if kv else None,
    )


def check_stats(got: Any, want: GenerationStats, require: bool, where: str) -> None:
    """Every field ``None`` or the reference (``require``: the reference's non-None fields present)."""
    assert isinstance(got, GenerationStats), f"{where}: generation_stats() returned {type(got).__name__}"
    for field in ("prefill_s", "decode_s", "decode_tokens", "decode_tok_s", "kvcache_bytes"):
        g, w = getattr(got, field), getattr(want, field)
        if g is None:
            assert not (require and w is not None), (
                f"{where}: {field} is None, but stream() holds the events that give {w}")
            continue
        assert w is not None, f"{where}: {field} = {g!r}, but the events say nothing about it (report None)"
        assert isinstance(g, (int, float)) and not isinstance(g, bool), f"{where}: {field} = {g!r} is not a number"
        assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {field} = {g}, reference {w}"


def check_stream(monitor: Monitor, events: tuple[Event, ...], where: str) -> bool:
    """``stream()`` empty or exactly ``events`` in order; returns whether it kept them."""
    first, second = list(monitor.stream()), list(monitor.stream())
    assert first == second, f"{where}: reading stream() twice gave different events (return a fresh iterator)"
    if not first:
        return False
    assert len(first) == len(events), f"{where}: stream() holds {len(first)} events, {len(events)} were recorded"
    for i, (got, (name, values)) in enumerate(zip(first, events)):
        assert isinstance(got, dict) and got.get("event") == name, f"{where}: event {i} is {got!r}, expected {name!r}"
        lost = {k: v for k, v in values.items() if got.get(k) != v}
        assert not lost, f"{where}: event {i} ({name}) lost or changed {lost} (got {got})"
    return True


class MonitorConformance(PluginConformance):
    """Conformance kit of the ``monitor`` family. Subclass it and set ``plugin`` (and ``options``)."""

    family: ClassVar[str] = "monitor"
    CASES: ClassVar[dict[str, tuple[Event, ...]]] = CASES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))

    def monitor(self) -> Monitor:
        impl: Monitor = self.make_impl()
        return impl

    def record_all(self, impl: Monitor, events: tuple[Event, ...]) -> None:
        for name, values in events:
            given = copy.deepcopy(values)
            assert impl.record(name, **given) is None, f"record({name!r}) returned a value"
            assert given == values, f"record({name!r}) changed the values it was given: {given} != {values}"

    # --- tests ---------------------------------------------------------------------------------

    def test_fresh_monitor_reports_unknown(self) -> None:
        impl = self.monitor()
        check_stats(impl.generation_stats(), GenerationStats(), False, "fresh monitor")
        assert list(impl.stream()) == [], "a fresh monitor's stream() holds events"
        json.dumps(impl.summary())

    def test_case(self, case_name: str) -> None:
        impl = self.monitor()
        events = type(self).CASES[case_name]
        self.record_all(impl, events)
        kept = check_stream(impl, events, f"case {case_name}")
        check_stats(impl.generation_stats(), reference_stats(events), kept, f"case {case_name}")
        summary = impl.summary()
        assert isinstance(summary, dict), f"summary() returned {type(summary).__name__}, expected a dict"
        try:
            json.dumps(summary)
        except (TypeError, ValueError) as err:
            raise AssertionError(f"case {case_name}: summary() is not plain data: {err}") from None

    def test_unknown_events_are_accepted(self) -> None:
        impl = self.monitor()
        events: tuple[Event, ...] = (("my.plugin.event", {"value": 3, "label": "x", "items": [1, 2]}),)
        self.record_all(impl, events)
        check_stream(impl, events, "an unknown event")
        check_stats(impl.generation_stats(), GenerationStats(), False, "an unknown event")
        json.dumps(impl.summary())

    def test_recording_never_changes_results(self, tmp_path: Path) -> None:
        """The same tokens as with the builtin ``timing`` monitor, and the monitor saw the generate calls."""
        model = tiny_runs.load(tiny_runs.checkpoint(tmp_path), "monitor", self.plugin, self.options)
        got = tiny_runs.tokens(model)
        want = tiny_runs.builtin_tokens("monitor", "timing")
        for kind in want:
            assert got[kind].shape == want[kind].shape and bool((got[kind] == want[kind]).all()), (
                f"{kind} generation differs with monitor {self.plugin!r}: {got[kind].tolist()} != "
                f"{want[kind].tolist()}"
            )
        monitor = model.pipeline.monitor
        stats = monitor.generation_stats()
        assert isinstance(stats, GenerationStats)
        events = list(monitor.stream())
        if events:
            seen = {e.get("event") for e in events}
            assert {"prefill", "decode"} <= seen, f"stream() after two generate calls holds only {sorted(seen)}"
            assert stats.decode_tokens is not None and stats.decode_tokens > 0, f"decode_tokens = {stats.decode_tokens}"
        json.dumps(monitor.summary())

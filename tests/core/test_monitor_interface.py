"""The CLI reads the monitor only through the ``Monitor`` interface (``generation_stats``, ``stream``).

``dsr1 generate --json`` used to parse the timing monitor's private ``summary()`` layout, so a
different monitor broke it. These tests swap in monitors with other layouts, and one that keeps
nothing, and check the CLI still reports what each one knows.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dsr1.cli import main
from dsr1.interfaces import GenerationStats, Monitor
from dsr1.monitor.timing import TimingMonitor
from tests.core.plugin_dist import fake_plugin  # noqa: F401  # the fixture

#: a monitor that keeps its own layout (totals by name, no event list) and answers the interface itself.
TOTALS = '''
from dsr1_sdk import GenerationStats, Monitor, PluginSpec, hookimpl

class TotalsMonitor(Monitor):
    def __init__(self, options=None):
        super().__init__(options)
        self.totals = {}

    def record(self, event, **values):
        self.totals.setdefault(event, []).append(values)

    def summary(self):
        return {"layout": "totals", "names": sorted(self.totals)}

    def generation_stats(self):
        decode = self.totals.get("decode", [])
        seconds = sum(v["seconds"] for v in decode)
        tokens = sum(v["tokens"] for v in decode)
        return GenerationStats(decode_s=seconds, decode_tokens=tokens, decode_tok_s=tokens / seconds)

@hookimpl
def dsr1_monitor():
    return PluginSpec(name="totals", family="monitor", impl=TotalsMonitor, description="test: totals")
'''

#: a monitor that records nothing at all.
SILENT = '''
from dsr1_sdk import Monitor, PluginSpec, hookimpl

class SilentMonitor(Monitor):
    def record(self, event, **values):
        pass

    def summary(self):
        return {}

@hookimpl
def dsr1_monitor():
    return PluginSpec(name="silent", family="monitor", impl=SilentMonitor, description="test: records nothing")
'''


def test_reference_stats_fold_the_recorded_events() -> None:
    m = TimingMonitor()
    m.record("prefill", seconds=0.5, tokens=10, batch_size=1)
    m.record("decode", seconds=2.0, tokens=8, steps=8, batch_size=1)
    m.record("decode", seconds=2.0, tokens=12, steps=12, batch_size=1)
    m.record("kvcache.bytes", bytes=100)
    m.record("kvcache.bytes", bytes=40)
    m.record("engine.step", seconds=9.0, requests=3)
    assert m.generation_stats() == GenerationStats(prefill_s=0.5, decode_s=4.0, decode_tokens=20, decode_tok_s=5.0,
                                                   kvcache_bytes=40)


def test_a_monitor_without_events_reports_unknown_not_zero() -> None:
    class Bare(Monitor):
        def record(self, event: str, **values: Any) -> None: ...

        def summary(self) -> dict[str, Any]:
            return {}

    bare = Bare()
    bare.record("decode", seconds=1.0, tokens=3)
    assert bare.generation_stats() == GenerationStats()  # all None: it kept nothing


def _generate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], monitor: str | None) -> dict[str, Any]:
    args = ["generate", "def add(a, b):", "--json", "--max-new-tokens", "4"]
    if monitor is not None:
        cfg = tmp_path / f"{monitor}.yaml"
        cfg.write_text(f"monitor: {monitor}\n")
        args += ["--config", str(cfg)]
    assert main(args) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_generate_json_with_the_timing_monitor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _generate_json(tmp_path, capsys, None)
    assert report["pipeline"]["monitor"]["name"] == "timing"
    assert report["new_tokens"] == 4
    t = report["timings"]
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and t["decode_tok_s"] > 0
    assert report["kvcache_bytes"] > 0


def test_generate_json_with_a_monitor_of_another_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_plugin: Callable[[str, str, str], str]
) -> None:
    fake_plugin("monitor", "totals", TOTALS)
    report = _generate_json(tmp_path, capsys, "totals")
    assert report["pipeline"]["monitor"]["name"] == "totals"
    assert report["new_tokens"] == 4  # from the monitor's own generation_stats
    t = report["timings"]
    assert t["decode_s"] > 0 and t["decode_tok_s"] > 0
    assert t["prefill_s"] is None and report["kvcache_bytes"] is None  # it does not keep them: said so, not 0


def test_generate_json_with_a_monitor_that_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_plugin: Callable[[str, str, str], str]
) -> None:
    fake_plugin("monitor", "silent", SILENT)
    report = _generate_json(tmp_path, capsys, "silent")
    assert report["pipeline"]["monitor"]["name"] == "silent"
    assert report["new_tokens"] == 4  # counted from the output ids
    assert set(report["timings"]) == {"load_s", "prefill_s", "decode_s", "decode_tok_s"}
    assert report["timings"]["decode_s"] is None and report["text"]

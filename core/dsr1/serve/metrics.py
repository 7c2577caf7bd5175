"""``/metrics``: the server's Prometheus figures, on a registry of its own.

Per-request figures (TTFT, TPOT, end-to-end latency, token counters, finished and rejected
requests) are observed by the request handlers as they happen. Engine state (requests running
and waiting, KV blocks, prefix-cache hits) is read at scrape time from the snapshot that the
engine loop publishes (:meth:`AsyncEngine.stats`), and the monitor plugin's figures through the
one interface every monitor has (:meth:`Monitor.generation_stats`), so any monitor works here;
a monitor that keeps per-operator latencies (``monitor: profiler``) adds them through
:meth:`Monitor.operator_stats` (``dsr1_operator_latency_*``, labelled by operator and bucket).
A registry per server (not prometheus-client's process-wide default) lets two servers, or a
server and its tests, live in one process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: TTFT buckets (s): from a CPU-cached prefix hit to a long prefill behind a queue.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
#: TPOT buckets (s): one decode step, from a captured graph on a big GPU to a CPU.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector(Collector):
    """Gauges read at scrape time from the engine's snapshot and the monitor's stats."""

    def __init__(self, stats: Callable[[], Mapping[str, Any] | None], monitor: Callable[[], Any],
                 draining: Callable[[], bool]) -> None:
        self.stats, self.monitor, self.draining = stats, monitor, draining

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("dsr1_server_draining", "1 while the server drains after SIGTERM",
                                value=1.0 if self.draining() else 0.0)
        s = self.stats()
        if s is None:  # still loading
            return
        gauges = {
            "dsr1_num_requests_running": ("requests in the running batch", s.get("running")),
            "dsr1_num_requests_waiting": ("requests waiting for admission", s.get("waiting")),
            "dsr1_kv_blocks_used": ("KV-cache blocks in use", s.get("blocks_used")),
            "dsr1_kv_blocks_total": ("KV-cache blocks in the pool", s.get("blocks_total")),
            "dsr1_prefix_cache_hit_rate": ("prompt tokens found in the prefix cache / prompt tokens looked up",
                                           s.get("prefix_hit_rate")),
        }
        for name, (doc, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        for name, key, doc in (("dsr1_prefix_cache_hits", "prefix_hits", "prompt tokens found in the prefix cache"),
                               ("dsr1_prefix_cache_queries", "prefix_queries", "prompt tokens looked up")):
            if s.get(key) is not None:
                yield CounterMetricFamily(name, doc, value=float(s[key]))
        monitor = self.monitor()
        if monitor is None:
            return
        g = monitor.generation_stats()
        for field, doc in (("prefill_s", "seconds of prefill the monitor recorded"),
                           ("decode_s", "seconds of decode the monitor recorded"),
                           ("decode_tokens", "tokens the decode loop produced, as the monitor recorded"),
                           ("decode_tok_s", "decode tokens per second, as the monitor recorded"),
                           ("kvcache_bytes", "bytes the KV cache held, as the monitor recorded")):
            value = getattr(g, field)
            if value is not None:
                yield GaugeMetricFamily(f"dsr1_monitor_{field}", doc, value=float(value))
        yield from _operator_families(monitor.operator_stats())


#: labels of the per-operator latencies (:class:`dsr1.interfaces.OperatorStat`).
OPERATOR_LABELS = ("operator", "phase", "batch_bucket", "context_bucket")


def _operator_families(stats: list[Any]) -> Iterator[Any]:
    """Per-operator step latencies of a monitor that keeps them (``monitor: profiler``); none otherwise."""
    if not stats:
        return
    mean = GaugeMetricFamily("dsr1_operator_latency_mean_seconds", "mean seconds per engine step in the operator "
                             "(operator 'step': the whole step), by phase and power-of-two batch / context bucket",
                             labels=OPERATOR_LABELS)
    var = GaugeMetricFamily("dsr1_operator_latency_variance_seconds_squared", "variance of those seconds per step",
                            labels=OPERATOR_LABELS)
    count = GaugeMetricFamily("dsr1_operator_latency_steps", "engine steps measured for those figures",
                              labels=OPERATOR_LABELS)
    for st in stats:
        labels = [st.operator, st.phase, str(st.batch_bucket), str(st.context_bucket)]
        mean.add_metric(labels, float(st.mean_s))
        var.add_metric(labels, float(st.variance_s))
        count.add_metric(labels, float(st.count))
    yield from (mean, var, count)


class ServerMetrics:
    """The server's metrics; the handlers call :meth:`finished` and :meth:`rejected`."""

    def __init__(self, stats: Callable[[], Mapping[str, Any] | None], monitor: Callable[[], Any],
                 draining: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("dsr1_time_to_first_token_seconds", "request received to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("dsr1_time_per_output_token_seconds", "mean time between a request's later tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("dsr1_e2e_request_latency_seconds", "request received to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dsr1_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsr1_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("dsr1_requests_finished", "finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejections = Counter("dsr1_requests_rejected", "requests refused, by HTTP status", ["status"],
                                  registry=r)
        r.register(_EngineCollector(stats, monitor, draining))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, output_tokens: int, finish_reason: str | None, latency: float,
                 decode_seconds: float | None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.requests.labels(finish_reason or "unknown").inc()
        self.latency.observe(latency)
        if decode_seconds is not None and output_tokens > 1:
            self.tpot.observe(decode_seconds / (output_tokens - 1))

    def rejected(self, status: int) -> None:
        self.rejections.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics"]

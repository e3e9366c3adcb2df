"""Prometheus text exposition of the engine's and the agent's counters, at /metrics."""

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from device.engine.engine import LATENCY_BUCKETS_MS, Engine


class AgentCollector:
    """Reads the live counters at scrape time; nothing is duplicated into prometheus objects."""

    def __init__(self, engine: Engine, extra: Callable[[], dict[str, Any]]) -> None:
        self.engine = engine
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "backend", "precision"]
        inferences = CounterMetricFamily("edgefleet_inferences", "Items inferred per model", labels=labels)
        errors = CounterMetricFamily(
            "edgefleet_inference_errors", "Items whose inference failed", labels=labels
        )
        latency = HistogramMetricFamily(
            "edgefleet_inference_latency_ms", "Engine call latency in milliseconds", labels=labels
        )
        for name in self.engine.names():
            serving = self.engine.get(name)
            values = [name, str(serving.manifest.version), serving.backend, serving.served_precision]
            stats = serving.stats.snapshot()
            inferences.add_metric(values, stats.inferences)
            errors.add_metric(values, stats.errors)
            cumulative = list(itertools.accumulate(stats.bucket_counts))
            bounds = [str(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
            latency.add_metric(values, list(zip(bounds, cumulative, strict=True)), stats.latency_sum_ms)
        yield from (inferences, errors, latency)
        extra = self.extra()
        pending = GaugeMetricFamily("edgefleet_telemetry_pending", "Records waiting in the telemetry outbox")
        pending.add_metric([], extra.get("telemetry_pending", 0))
        evicted = CounterMetricFamily(
            "edgefleet_telemetry_evicted", "Outbox records evicted", labels=["kind"]
        )
        for kind, count in extra.get("telemetry_evicted", {}).items():
            evicted.add_metric([kind], count)
        state = GaugeMetricFamily("edgefleet_update_state", "1 for the update state now", labels=["state"])
        state.add_metric([extra.get("update_state", "idle")], 1)
        yield from (pending, evicted, state)


def render(engine: Engine, extra: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(engine, extra))
    return generate_latest(registry)

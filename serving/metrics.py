"""Prometheus metrics of the rails API: latency per stage and per rail, fallbacks, errors,
and the process's cycle-collector pauses (a p99 made of them shows as such).

Each app owns its registry, so several apps (tests, replicas in one process) never collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from railtower.heap import GcPauses, gc_pauses

# Latency buckets from 1 ms to 2.5 s: rails live in the tens of milliseconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "railtower_rail_seconds",
            "Rail request latency by rail and by how it was served",
            ["rail", "served_by"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "railtower_stage_seconds",
            "Latency of each stage of a rail request",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "railtower_fallbacks_total",
            "Requests that degraded, by the part that was slow or down",
            ["reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "railtower_errors_total", "Errors by kind", ["kind"], registry=self.registry
        )
        self.cache_hits = Counter(
            "railtower_cache_hits_total",
            "Rails served pre-warmed from Redis",
            registry=self.registry,
        )
        self.model_info = Info("railtower_model", "The served model", registry=self.registry)
        # Impression logging and shadow traffic (serving/impressions.py, serving/shadow.py).
        self.impressions = Counter(
            "railtower_impressions_total",
            "Impressions by arm kind (production, challenger, rules) and outcome "
            "(logged, dropped: sink buffer full, failed: the broker refused it)",
            ["arm", "outcome"],
            registry=self.registry,
        )
        self.shadow_jobs = Counter(
            "railtower_shadow_jobs_total",
            "Shadow jobs by outcome (queued, completed, dropped: queue full, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.shadow_seconds = Histogram(
            "railtower_shadow_seconds",
            "Time one shadow arm took to compute, off the request path",
            ["arm"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(GcPauseCollector(gc_pauses()))


class GcPauseCollector(Collector):
    """The process's cycle-collector pauses (railtower.heap.GcPauses) per generation: a
    generation-2 pause holds the GIL and stalls every request in flight."""

    def __init__(self, pauses: GcPauses) -> None:
        self.pauses = pauses

    def collect(self) -> Iterator[Metric]:
        count = CounterMetricFamily(
            "railtower_gc_pauses", "Cycle-collector runs by generation", labels=["generation"]
        )
        seconds = CounterMetricFamily(
            "railtower_gc_pause_seconds",
            "Time spent in cycle-collector runs by generation",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "railtower_gc_pause_longest_seconds",
            "The longest cycle-collector run by generation since the process started",
            labels=["generation"],
        )
        for generation in range(3):
            label = [str(generation)]
            count.add_metric(label, self.pauses.count[generation])
            seconds.add_metric(label, self.pauses.seconds[generation])
            longest.add_metric(label, self.pauses.longest[generation])
        yield from (count, seconds, longest)

"""Metrics: the Prometheus counters the gateway serves on ``/metrics``.

Labels are tier, route, status, limit kind and outcome: never an API key or an IP address
(their cardinality is unbounded).

Counted in plain dicts, rendered through a collector: a proxied request bumps about eight
series, and ``prometheus_client``'s own metric objects take a lock and check their state on
every ``inc`` (measured at 5% of the gateway's CPU per completion). The event loop is one
thread, so a dict is enough; ``/metrics`` reads the counts when it is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .storage import STORAGE_MODES, StorageMode

__all__ = ["CONTENT_TYPE_LATEST", "PrometheusMetrics"]

#: Decision time buckets (seconds): one storage call, in memory or on a nearby Redis.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

_Counts = dict[tuple[str, ...], float]


class PrometheusMetrics:
    """The gateway's counters, in a registry of their own (one per gateway app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._requests: _Counts = {}
        self._rejections: _Counts = {}
        self._shadow: _Counts = {}
        self._unlimited: _Counts = {}
        self._tokens: _Counts = {}
        self._in_flight: _Counts = {}
        self._mode: StorageMode | None = None
        self._decision_buckets = [0] * (len(_BUCKETS) + 1)  # the last one: +Inf
        self._decision_sum = 0.0
        self.registry.register(_Collector(self))

    def request(self, tier: str, route: str, status: int) -> None:
        key = (tier, route, str(status))
        self._requests[key] = self._requests.get(key, 0) + 1

    def rejection(self, tier: str, limit: str) -> None:
        key = (tier, limit)
        self._rejections[key] = self._rejections.get(key, 0) + 1

    def shadow_rejection(self, tier: str, limit: str) -> None:
        key = (tier, limit)
        self._shadow[key] = self._shadow.get(key, 0) + 1

    def unlimited(self, tier: str) -> None:
        key = (tier,)
        self._unlimited[key] = self._unlimited.get(key, 0) + 1

    def tokens(self, tier: str, kind: str, amount: int) -> None:
        if amount > 0:
            key = (tier, kind)
            self._tokens[key] = self._tokens.get(key, 0) + amount

    def decision_seconds(self, seconds: float) -> None:
        self._decision_buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self._decision_sum += seconds

    def in_flight(self, tier: str, delta: int) -> None:
        key = (tier,)
        self._in_flight[key] = self._in_flight.get(key, 0) + delta

    def storage_mode(self, mode: StorageMode) -> None:
        self._mode = mode

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """Hands ``prometheus_client`` the counts as metric families when it is scraped."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _counter(
            "quotagate_requests", "Requests answered", ["tier", "route", "status"], m._requests
        )
        yield _counter(
            "quotagate_rejections",
            "Requests rejected, by the limit that rejected them",
            ["tier", "limit"],
            m._rejections,
        )
        yield _counter(
            "quotagate_shadow_rejections",
            "Requests a shadow limit would have rejected (admitted anyway)",
            ["tier", "limit"],
            m._shadow,
        )
        yield _counter(
            "quotagate_unlimited_decisions",
            "Requests admitted without counting (storage down, fallback policy allow)",
            ["tier"],
            m._unlimited,
        )
        yield _counter(
            "quotagate_tokens",
            "Tokens reserved before a request, charged after it, and refunded",
            ["tier", "kind"],
            m._tokens,
        )
        histogram = HistogramMetricFamily(
            "quotagate_decision_seconds", "Time to decide a request's limits (one storage call)"
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*_BUCKETS, float("inf")), m._decision_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        histogram.add_metric([], buckets, m._decision_sum)
        yield histogram
        in_flight = GaugeMetricFamily(
            "quotagate_in_flight", "Requests being served, by tier", labels=["tier"]
        )
        for labels, value in m._in_flight.items():
            in_flight.add_metric(list(labels), value)
        yield in_flight
        if m._mode is not None:
            mode = GaugeMetricFamily(
                "quotagate_storage_mode",
                "1 for the mode decisions are made in now (memory, redis or fallback)",
                labels=["mode"],
            )
            for name in STORAGE_MODES:
                mode.add_metric([name], 1 if name == m._mode else 0)
            yield mode


def _counter(name: str, documentation: str, labels: list[str], counts: _Counts) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in counts.items():
        family.add_metric(list(values), count)
    return family

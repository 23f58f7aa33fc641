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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .storage import STORAGE_MODES, StorageMode

__all__ = ["CONTENT_TYPE_LATEST", "PrometheusMetrics", "ReplicaState"]

#: Decision time buckets (seconds): one storage call, in memory or on a nearby Redis.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

#: Time to first byte from a model server (seconds): a cached answer up to a long prompt's prefill.
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_Counts = dict[tuple[str, ...], float]


class ReplicaState(NamedTuple):
    """One replica as ``/metrics`` shows it (read from the gateway when scraped)."""

    backend: str
    replica: str
    in_flight: int
    up: bool
    limit: int  # requests it may carry now (the adaptive controller's, or max_concurrency)


class PrometheusMetrics:
    """The gateway's counters, in a registry of their own (one per gateway app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._requests: _Counts = {}
        self._rejections: _Counts = {}
        self._shadow: _Counts = {}
        self._unlimited: _Counts = {}
        self._cuts: _Counts = {}
        self._tokens: _Counts = {}
        self._in_flight: _Counts = {}
        self._mode: StorageMode | None = None
        self._decision_buckets = [0] * (len(_BUCKETS) + 1)  # the last one: +Inf
        self._decision_sum = 0.0
        self._upstream: _Counts = {}
        self._failovers: _Counts = {}
        self._ttfb: dict[tuple[str, str], list[float]] = {}  # bucket counts, then the sum
        #: Read when scraped: every replica, and every backend's queue length.
        self.replicas: Callable[[], Iterable[ReplicaState]] = tuple
        self.queues: Callable[[], Iterable[tuple[str, int]]] = tuple
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

    def cut(self, tier: str, how: str) -> None:
        """An answer held to what its client's limits still allowed: ``stream`` (ended by
        the gateway) or ``max_tokens`` (injected upstream)."""
        key = (tier, how)
        self._cuts[key] = self._cuts.get(key, 0) + 1

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

    def upstream(self, backend: str, replica: str, outcome: str) -> None:
        key = (backend, replica, outcome)
        self._upstream[key] = self._upstream.get(key, 0) + 1

    def first_byte(self, backend: str, replica: str, seconds: float) -> None:
        counts = self._ttfb.get((backend, replica))
        if counts is None:
            counts = self._ttfb[(backend, replica)] = [0.0] * (len(_TTFB_BUCKETS) + 2)
        counts[bisect.bisect_left(_TTFB_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def failover(self, backend: str, replica: str) -> None:
        key = (backend, replica)
        self._failovers[key] = self._failovers.get(key, 0) + 1

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
            "quotagate_allowance_cuts",
            "Answers held to what the client's token limits or budget still allowed",
            ["tier", "how"],
            m._cuts,
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
        histogram.add_metric([], _cumulative(_BUCKETS, m._decision_buckets), m._decision_sum)
        yield histogram
        in_flight = GaugeMetricFamily(
            "quotagate_in_flight", "Requests being served, by tier", labels=["tier"]
        )
        for labels, value in m._in_flight.items():
            in_flight.add_metric(list(labels), value)
        yield in_flight
        yield from _backend_metrics(m)
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


def _backend_metrics(m: PrometheusMetrics) -> Iterator[Metric]:
    labels = ["backend", "replica"]
    in_flight = GaugeMetricFamily(
        "quotagate_backend_in_flight", "Requests in flight to a replica", labels=labels
    )
    up = GaugeMetricFamily(
        "quotagate_backend_up", "1 while a replica is healthy (takes requests)", labels=labels
    )
    limit = GaugeMetricFamily(
        "quotagate_backend_concurrency_limit",
        "Requests a replica may carry now: max_concurrency, or what [backends.adaptive] found",
        labels=labels,
    )
    states = list(m.replicas())
    # A replica gone from the fleet (and done with its requests) takes its series along: their
    # number stays bounded by the config, not by every replica an autoscaler ever had.
    live = {(state.backend, state.replica) for state in states}
    for series in (m._upstream, m._failovers, m._ttfb):
        for key in [key for key in series if key[:2] not in live]:
            del series[key]  # type: ignore[arg-type]
    for state in states:
        in_flight.add_metric([state.backend, state.replica], state.in_flight)
        up.add_metric([state.backend, state.replica], 1 if state.up else 0)
        limit.add_metric([state.backend, state.replica], state.limit)
    queued = GaugeMetricFamily(
        "quotagate_backend_queued", "Requests waiting for a slot on a backend", labels=["backend"]
    )
    for backend, count in m.queues():
        queued.add_metric([backend], count)
    yield from (in_flight, up, limit, queued)
    yield _counter(
        "quotagate_upstream_requests",
        "Requests sent to a replica, by outcome (ok, rejected, full, error, timeout, unavailable)",
        [*labels, "outcome"],
        m._upstream,
    )
    yield _counter(
        "quotagate_failovers",
        "Requests moved off a replica that could not be reached (so never started them)",
        labels,
        m._failovers,
    )
    ttfb = HistogramMetricFamily(
        "quotagate_upstream_first_byte_seconds",
        "Time from sending a request to a replica to its first byte of answer",
        labels=labels,
    )
    for (backend, replica), counts in m._ttfb.items():
        ttfb.add_metric([backend, replica], _cumulative(_TTFB_BUCKETS, counts[:-1]), counts[-1])
    yield ttfb


def _cumulative(bounds: tuple[float, ...], counts: Sequence[float]) -> list[tuple[str, float]]:
    total = 0.0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return buckets

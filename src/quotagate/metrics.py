"""Metrics: the Prometheus counters the gateway serves on ``/metrics``.

Labels are tier, route, status, limit kind and outcome: never an API key or an IP address
(their cardinality is unbounded).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .storage import STORAGE_MODES, StorageMode

__all__ = ["CONTENT_TYPE_LATEST", "PrometheusMetrics"]


class PrometheusMetrics:
    """Prometheus counters in a registry of their own (one per gateway app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = self.registry
        self._requests = Counter(
            "quotagate_requests", "Requests answered", ["tier", "route", "status"], registry=r
        )
        self._rejections = Counter(
            "quotagate_rejections",
            "Requests rejected, by the limit that rejected them",
            ["tier", "limit"],
            registry=r,
        )
        self._shadow = Counter(
            "quotagate_shadow_rejections",
            "Requests a shadow limit would have rejected (admitted anyway)",
            ["tier", "limit"],
            registry=r,
        )
        self._unlimited = Counter(
            "quotagate_unlimited_decisions",
            "Requests admitted without counting (storage down, fallback policy allow)",
            ["tier"],
            registry=r,
        )
        self._tokens = Counter(
            "quotagate_tokens",
            "Tokens reserved before a request, charged after it, and refunded",
            ["tier", "kind"],
            registry=r,
        )
        self._decision = Histogram(
            "quotagate_decision_seconds",
            "Time to decide a request's limits (one storage call)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self._in_flight = Gauge(
            "quotagate_in_flight", "Requests being served, by tier", ["tier"], registry=r
        )
        self._mode = Gauge(
            "quotagate_storage_mode",
            "1 for the mode decisions are made in now (memory, redis or fallback)",
            ["mode"],
            registry=r,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels`` takes a lock and builds a tuple
        of strings every call, on the hot path several times per request."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, tier: str, route: str, status: int) -> None:
        self._child(self._requests, tier, route, str(status)).inc()

    def rejection(self, tier: str, limit: str) -> None:
        self._child(self._rejections, tier, limit).inc()

    def shadow_rejection(self, tier: str, limit: str) -> None:
        self._child(self._shadow, tier, limit).inc()

    def unlimited(self, tier: str) -> None:
        self._child(self._unlimited, tier).inc()

    def tokens(self, tier: str, kind: str, amount: int) -> None:
        if amount > 0:
            self._child(self._tokens, tier, kind).inc(amount)

    def decision_seconds(self, seconds: float) -> None:
        self._decision.observe(seconds)

    def in_flight(self, tier: str, delta: int) -> None:
        self._child(self._in_flight, tier).inc(delta)

    def storage_mode(self, mode: StorageMode) -> None:
        for name in STORAGE_MODES:
            self._mode.labels(name).set(1 if name == mode else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

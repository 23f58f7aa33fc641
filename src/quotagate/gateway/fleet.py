"""The fleet: the backends requests are routed to by model, their replicas and their health.

A backend (``[[backends]]``, or the single ``[backend]`` table) is replicas of the same models
behind one queue (``gate``). A replica that fails to connect, or answers 5xx or garbage, three
times in a row is marked down; the active probe (``GET <url>/models`` every
``health_interval_s``) brings it back, and reads the models of a backend that lists none.
A reload changes the fleet in place: a new replica takes requests at once, a removed one takes
no new ones and is closed once what it carries has finished.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx

from .adaptive import Controller, Load
from .backends import Backend, UpstreamError
from .config import CATCH_ALL, LEGACY_BACKEND, FleetBackendConfig
from .gate import BackendUnavailable, QueueFull, Replica, ReplicaGate, Ticket

__all__ = [
    "BackendFactory",
    "BackendPool",
    "BackendUnavailable",
    "Fleet",
    "QueueFull",
    "Replica",
    "Target",
    "Ticket",
    "metrics_url",
]

logger = logging.getLogger("quotagate")

#: Failures in a row that mark a replica down.
DOWN_AFTER = 3
#: What a backend's replicas are built with: a change builds them anew (the others apply live).
_CLIENT_FIELDS = ("kind", "api_key_env", "timeout_s", "connect_timeout_s", "mock_tokens_per_second")

BackendFactory = Callable[[FleetBackendConfig, str | None], Backend]


class Target(NamedTuple):
    """Where a request goes: the backend, and the model name sent upstream."""

    pool: BackendPool
    upstream_model: str | None


def replica_label(url: str | None) -> str:
    """``host:port`` of a replica's URL (its metrics label), ``mock`` for the in-process mock."""
    if url is None:
        return "mock"
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendPool:
    """One backend: its replicas, their shared queue, health checks and models."""

    def __init__(
        self, spec: FleetBackendConfig, make: BackendFactory, on_models: Callable[[], None]
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._make = make
        self._on_models = on_models
        self.replicas: list[Replica] = [self._replica(url) for url in _urls(spec)]
        self.retiring: list[Replica] = []
        self.gate = ReplicaGate(self.replicas)
        self._gate_settings()
        self.next_probe = 0.0  # time.monotonic() of the next probe
        self._probing: asyncio.Task[None] | None = None
        self._adapting: asyncio.Task[None] | None = None
        self._scraper: httpx.AsyncClient | None = None
        self._scrape_failed: set[str] = set()  # replicas whose metrics could not be read
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False

    def _replica(self, url: str | None) -> Replica:
        backend = self._make(self.spec, url)
        replica = Replica(backend, url, replica_label(url), self.spec.max_concurrency)
        self._control(replica)
        return replica

    def _control(self, replica: Replica) -> None:
        """Give the replica an adaptive controller, or take it away, as the entry says."""
        adaptive = self.spec.adaptive
        if adaptive is None:
            replica.controller = None
            return
        if replica.controller is None:
            replica.controller = Controller(
                min_concurrency=adaptive.min_concurrency,
                max_concurrency=self.spec.max_concurrency,
                in_flight=lambda: replica.in_flight,
            )
        replica.controller.configure(
            min_concurrency=adaptive.min_concurrency,
            max_concurrency=self.spec.max_concurrency,
            target_waiting=adaptive.target_waiting,
            headroom=adaptive.headroom,
            latency_tolerance=adaptive.latency_tolerance,
        )

    def _gate_settings(self) -> None:
        spec = self.spec
        self.gate.max_queued = spec.max_queued
        wait = spec.max_queue_wait_ms
        self.gate.max_wait = None if wait is None else wait / 1000

    # -- what it serves ---------------------------------------------------------------------

    @property
    def catch_all(self) -> bool:
        return self.spec.models == [CATCH_ALL]

    @property
    def checks_health(self) -> bool:
        return self.spec.health_interval_s > 0

    def models(self) -> list[str]:
        """The model names this backend serves: listed in the config, else read from its
        replicas' ``GET /models`` (in the order first seen)."""
        if self.spec.models is not None and not self.catch_all:
            return list(self.spec.models)
        seen: dict[str, None] = {}
        for replica in self.replicas:
            seen.update(dict.fromkeys(replica.models))
        return list(seen)

    def describe(self) -> str:
        names = self.models() + [f"{a}->{m}" for a, m in self.spec.aliases.items()]
        replicas = f"{len(self.replicas)} replica" + ("s" if len(self.replicas) != 1 else "")
        return f"{self.name} ({self.spec.kind}, {replicas}: {', '.join(names) or '?'})"

    async def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` entries. A catch-all that is never probed (the single ``[backend]``
        table) has no list of its own: it is asked now, and its answer passed on as it is."""
        if self.catch_all and not self.checks_health and self.replicas:
            return await self.replicas[0].backend.models()
        names = self.models() + list(self.spec.aliases)
        return [{"id": n, "object": "model", "created": 0, "owned_by": self.name} for n in names]

    # -- slots ---------------------------------------------------------------------------------

    async def acquire(
        self,
        ticket: Ticket | int,
        exclude: tuple[Replica, ...] = (),
        *,
        wait: float | None = None,
        again: bool = False,
    ) -> Replica | None:
        """A slot on a replica within ``wait`` (the queue timeout by default; None: none
        came). Raises ``BackendUnavailable`` when no healthy replica is left to wait for,
        ``QueueFull`` when ``max_queued`` wait already."""
        timeout = self.spec.queue_timeout_ms / 1000 if wait is None else wait
        replica = await self.gate.acquire(ticket, timeout, exclude, again=again)
        if replica is not None and replica.controller is not None:
            replica.controller.started()
        return replica

    def release(self, replica: Replica) -> None:
        self.gate.release(replica)
        if replica.retired and replica.in_flight == 0 and replica in self.retiring:
            self.retiring.remove(replica)
            self._close(replica)

    def overloaded(self, replica: Replica) -> None:
        """The replica answered 429 or 503 (it is full): its limit is cut at once."""
        controller = replica.controller
        if controller is not None and controller.overloaded():
            logger.info(
                "quotagate: backend %s replica %s said it is full: concurrency limit now %d",
                self.name,
                replica.label,
                controller.limit,
            )

    def retry_after(self) -> int:
        """Seconds until the next probe may bring a replica back (at least 1)."""
        if not self.checks_health:
            return 1
        return max(1, math.ceil(self.next_probe - time.monotonic()))

    # -- health --------------------------------------------------------------------------------

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0

    def failed(self, replica: Replica, exc: UpstreamError) -> None:
        """Count a failure against the replica; the third in a row marks it down."""
        if self.checks_health and exc.replica_fault and not replica.retired:
            self._count_failure(replica, "failures", exc.message)

    def _count_failure(self, replica: Replica, what: str, reason: str) -> None:
        replica.failures += 1
        if replica.up and replica.failures >= DOWN_AFTER:
            self._down(replica, f"{replica.failures} {what} in a row, the last: {reason}")

    def _down(self, replica: Replica, reason: str) -> None:
        replica.up = False
        logger.warning(
            "quotagate: backend %s replica %s is down (%s); probing every %g s",
            self.name,
            replica.label,
            reason,
            self.spec.health_interval_s,
        )
        self.gate.dispatch()  # waiters with no healthy replica left are answered now

    def _up(self, replica: Replica) -> None:
        replica.up = True
        replica.failures = 0
        logger.info("quotagate: backend %s replica %s is up", self.name, replica.label)
        self.gate.dispatch()

    async def probe(self, replica: Replica, *, first: bool = False) -> None:
        """``GET /models`` on one replica: 2xx brings it up (and lists its models); a failure
        counts against it. A replica whose first probe fails starts down."""
        bound = max(self.spec.connect_timeout_s, self.spec.health_interval_s or 5.0)
        try:
            async with asyncio.timeout(bound):
                listed = await replica.backend.models()
        except (UpstreamError, TimeoutError) as exc:
            if replica.retired or not self.checks_health:
                return
            reason = exc.message if isinstance(exc, UpstreamError) else f"no answer in {bound:g} s"
            if first and replica.up:
                self._down(replica, f"its first probe failed: {reason}")
            else:
                self._count_failure(replica, "failed probes", reason)
            return
        names = [e["id"] for e in listed if isinstance(e, dict) and isinstance(e.get("id"), str)]
        changed = names != replica.models
        replica.models = names
        if not replica.up and not replica.retired:
            self._up(replica)
        else:
            replica.failures = 0
        if changed:
            self._on_models()

    async def probe_all(self, *, first: bool = False) -> None:
        await asyncio.gather(*(self.probe(replica, first=first) for replica in list(self.replicas)))

    async def start(self) -> None:
        """Probe every replica once (their models, their state), then every interval."""
        if self.checks_health or self.spec.models is None:
            await self.probe_all(first=True)
        self._schedule()
        self._schedule_adaptive()

    # -- adaptive concurrency --------------------------------------------------------------------

    def _schedule_adaptive(self) -> None:
        running = self._adapting is not None and not self._adapting.done()
        if self.spec.adaptive is not None and not running and not self.closed:
            self._adapting = asyncio.get_running_loop().create_task(self._adapt_loop())
        elif self.spec.adaptive is None and self._adapting is not None:
            self._adapting.cancel()
            self._adapting = None

    async def _adapt_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while self.spec.adaptive is not None:
            interval = self.spec.adaptive.interval_ms / 1000
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self.adapt(max(interval, 1.0))  # a busy server's metrics may be slow
            except Exception:  # one bad interval must never end the loop
                logger.exception("quotagate: backend %s: adapting concurrency failed", self.name)

    async def adapt(self, within: float = 1.0) -> None:
        """One interval: read every replica's metrics (within ``within`` seconds), then each
        controller decides; a raised limit hands its slots to the queue."""
        adaptive = self.spec.adaptive
        if adaptive is None:
            return
        replicas = [r for r in self.replicas if r.controller is not None]
        loads = await asyncio.gather(
            *(self._scrape(r, adaptive.metrics_url, within) for r in replicas)
        )
        raised = False
        for replica, load in zip(replicas, loads, strict=True):
            controller = replica.controller
            assert controller is not None
            controller.load(load)
            before = controller.limit
            change = controller.tick()
            if change is not None:
                logger.debug(
                    "quotagate: backend %s replica %s: concurrency limit %d -> %d (%s)",
                    self.name,
                    replica.label,
                    before,
                    controller.limit,
                    controller.reason,
                )
            raised = raised or change == "increase"
        if raised:
            self.gate.dispatch()

    async def _scrape(self, replica: Replica, setting: str, within: float) -> Load | None:
        url = metrics_url(setting, replica.url)
        if url is None:
            return None
        if self._scraper is None:
            self._scraper = httpx.AsyncClient()
        try:
            response = await self._scraper.get(url, timeout=within)
            response.raise_for_status()
            load = Load.parse(response.text)
            if load is None:
                raise ValueError("none of the vLLM or llama.cpp load metrics are there")
        except (httpx.HTTPError, ValueError) as exc:
            if replica.label not in self._scrape_failed:
                self._scrape_failed.add(replica.label)
                logger.info(
                    "quotagate: backend %s replica %s: no load metrics at %s (%s); "
                    "following its answers and latency only",
                    self.name,
                    replica.label,
                    url,
                    exc,
                )
            return None
        if replica.label in self._scrape_failed:
            self._scrape_failed.discard(replica.label)
            logger.info(
                "quotagate: backend %s replica %s: reading its load metrics at %s",
                self.name,
                replica.label,
                url,
            )
        return load

    def _schedule(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            self._probing = None
        if self.checks_health and not self.closed:
            self.next_probe = time.monotonic() + self.spec.health_interval_s
            self._probing = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.next_probe - time.monotonic()))
            self.next_probe = time.monotonic() + self.spec.health_interval_s
            try:
                await self.probe_all()
            except Exception:  # a probe must never end the loop
                logger.exception("quotagate: backend %s: probing failed", self.name)

    # -- reload --------------------------------------------------------------------------------

    def reconfigure(self, spec: FleetBackendConfig) -> list[Replica]:
        """Take the new entry: replicas added and removed by URL, limits and intervals changed
        in place; returns the new replicas (to probe)."""
        rebuild = any(getattr(spec, f) != getattr(self.spec, f) for f in _CLIENT_FIELDS)
        interval_changed = spec.health_interval_s != self.spec.health_interval_s
        self.spec = spec
        kept = {} if rebuild else {r.url: r for r in self.replicas}
        replicas, added = [], []
        for url in _urls(spec):
            replica = kept.pop(url, None)
            if replica is None:
                replica = self._replica(url)
                added.append(replica)
            replica.max_concurrency = spec.max_concurrency
            self._control(replica)
            replicas.append(replica)
        gone = [r for r in self.replicas if r not in replicas]
        self.replicas[:] = replicas  # in place: the gate reads the same list
        for replica in gone:
            self._retire(replica)
        if interval_changed:
            self._schedule()
        self._gate_settings()
        self._schedule_adaptive()
        self.gate.dispatch()
        return added

    def retire(self) -> None:
        """The backend left the config: no new requests; closed once its own finish."""
        self.closed = True
        for task in (self._probing, self._adapting):
            if task is not None:
                task.cancel()
        gone, self.replicas[:] = list(self.replicas), []
        for replica in gone:
            self._retire(replica)
        self.gate.dispatch()

    def _retire(self, replica: Replica) -> None:
        replica.retired = True
        if replica.in_flight:
            self.retiring.append(replica)
        else:
            self._close(replica)

    def _close(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(replica.backend.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        self.closed = True
        for task in (self._probing, self._adapting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._scraper is not None:
            await self._scraper.aclose()
        for replica in [*self.replicas, *self.retiring]:
            await replica.backend.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def all_replicas(self) -> Iterator[Replica]:
        yield from self.replicas
        yield from self.retiring


class Fleet:
    """Every backend, and the table from a model name (or alias) to where it goes."""

    def __init__(self, specs: list[FleetBackendConfig], make: BackendFactory) -> None:
        self._make = make
        self.pools: dict[str, BackendPool] = {}
        self._leaving: list[BackendPool] = []  # removed by a reload, finishing their requests
        self._routes: dict[str, Target] = {}
        self._catch_all: BackendPool | None = None
        for spec in specs:
            self.pools[spec.name] = BackendPool(spec, make, self._route_models)
        self._route_models()

    def route(self, model: str | None) -> Target | None:
        """The backend for ``model`` and the name to send it: listed models first, then the
        aliases, then the catch-all; None when no backend serves it."""
        if model is not None:
            target = self._routes.get(model)
            if target is not None:
                return target
        pool = self._catch_all
        return None if pool is None else Target(pool, model)

    def _route_models(self) -> None:
        # What the config names beats what a server lists; in config order, the first wins.
        pools = list(self.pools.values())
        routes: dict[str, Target] = {}
        for pool in pools:
            if pool.spec.models is not None and not pool.catch_all:
                routes.update((n, Target(pool, n)) for n in pool.models() if n not in routes)
        for pool in pools:
            for alias, upstream in pool.spec.aliases.items():
                routes.setdefault(alias, Target(pool, upstream))
        for pool in pools:
            if pool.spec.models is None:
                routes.update((n, Target(pool, n)) for n in pool.models() if n not in routes)
        self._routes = routes
        self._catch_all = next((pool for pool in pools if pool.catch_all), None)

    async def models(self) -> list[dict[str, Any]]:
        """Every model and alias of every backend, once each."""
        seen: set[str] = set()
        data = []
        for pool in self.pools.values():
            for entry in await pool.listing():
                name = entry.get("id") if isinstance(entry, dict) else None
                if name not in seen:
                    seen.add(name)  # type: ignore[arg-type]
                    data.append(entry)
        return data

    def state(self) -> dict[str, dict[str, Any]]:
        """Per backend: replicas, healthy ones, requests in flight and queued (``/health``);
        with ``adaptive``, each replica's concurrency limit now."""
        states: dict[str, dict[str, Any]] = {}
        for name, pool in self.pools.items():
            state: dict[str, Any] = {
                "replicas": len(pool.replicas),
                "healthy": sum(1 for r in pool.replicas if r.serving),
                "in_flight": sum(r.in_flight for r in pool.all_replicas()),
                "queued": pool.gate.queued,
            }
            if pool.spec.adaptive is not None:
                state["concurrency"] = {r.label: r.limit for r in pool.replicas}
            states[name] = state
        return states

    def describe(self) -> str:
        """For the start-up and reload lines: ``backend mock``, or each backend and its models."""
        pools = list(self.pools.values())
        if len(pools) == 1 and pools[0].name == LEGACY_BACKEND:
            replica = pools[0].spec.urls[0] if pools[0].spec.urls else ""
            return f"backend {pools[0].spec.kind} {replica}".rstrip()
        return "backends " + ", ".join(pool.describe() for pool in pools)

    def replicas(self) -> Iterator[tuple[BackendPool, Replica]]:
        for pool in [*self.pools.values(), *self._leaving]:
            for replica in pool.all_replicas():
                yield pool, replica

    async def start(self) -> None:
        await asyncio.gather(*(pool.start() for pool in self.pools.values()))

    def reload(self, specs: list[FleetBackendConfig]) -> asyncio.Future[Any]:
        """Apply a reloaded ``[[backends]]`` now: new backends and replicas take requests,
        removed ones finish what they carry. Returns their first probes, to run."""
        wanted = {spec.name: spec for spec in specs}
        probes: list[Awaitable[None]] = []
        for name in [n for n in self.pools if n not in wanted]:
            pool = self.pools.pop(name)
            pool.retire()
            self._leaving.append(pool)
        pools = {}
        for spec in specs:
            known = self.pools.get(spec.name)
            if known is None:
                known = BackendPool(spec, self._make, self._route_models)
                probes.append(known.start())
            else:
                probes += (known.probe(r, first=True) for r in known.reconfigure(spec))
            pools[spec.name] = known
        self.pools = pools  # in the file's order
        self._leaving = [p for p in self._leaving if any(True for _ in p.all_replicas())]
        self._route_models()
        return asyncio.gather(*probes)

    async def aclose(self) -> None:
        for pool in [*self.pools.values(), *self._leaving]:
            await pool.aclose()


def metrics_url(setting: str, replica_url: str | None) -> str | None:
    """Where a replica's Prometheus metrics are: ``auto`` is its URL less ``/v1``, then
    ``/metrics``; a path is on the replica's host; a URL is itself; ``""`` is nowhere."""
    if not setting or replica_url is None:
        return None
    if setting == "auto":
        base = replica_url.rstrip("/")
        base = base.removesuffix("/v1")
        return base + "/metrics"
    if setting.startswith("/"):
        parts = urlsplit(replica_url)
        return f"{parts.scheme}://{parts.netloc}{setting}"
    return setting


def _urls(spec: FleetBackendConfig) -> list[str | None]:
    return list(spec.urls) if spec.kind == "openai" else [None]

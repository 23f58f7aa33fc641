"""``quotagate serve``: an OpenAI-compatible gateway that rate limits in front of a model server.

Per request, one call per step: identify the caller (API key or anonymous IP: its tier) ->
read the bounded JSON body -> validate it -> route its model to a backend -> cost it (prompt
estimate + output cap, times n) -> decide: ONE storage call checks requests, tokens and a
concurrency lease, all or nothing -> gate: a slot on one of the backend's replicas, queued by
tier priority -> the replica (another one if it could not be reached) -> settle the tokens on
the real usage and release the lease, in one more call. Every step that can fail answers with a
precise status and a JSON error; nothing is left reserved or held.

The steps live beside this module: ``callers`` (tiers, identify, the limits of a request),
``body``, ``tokens`` (cost), ``ledger`` (reserve / settle / undo), ``fleet`` (routing, replicas,
health) and its ``gate``, ``backends``, ``relay`` (streams and usage) and ``responses`` (the
error shape).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from .._asgi import RawResponse
from ..decision import Decision
from ..http import (
    NO_RETRY,
    Headers,
    openai_headers,
    rate_limit_headers,
    rejected_limit,
    retry_after_ms,
)
from ..keys import BUDGET, HEALTH, client_state_key
from ..limiter import Hit, RateLimiter
from ..metrics import CONTENT_TYPE_LATEST, PrometheusMetrics, ReplicaState
from ..rates import parse_rates
from ..storage import FallbackStorage, Storage, mask_url
from .admin import Admin
from .backends import (
    Backend,
    Route,
    UpstreamError,
    UpstreamFull,
    UpstreamRejected,
    backend_from_config,
)
from .body import read_json
from .budgets import budget_headers, describe_budgets, over_budget, room, split
from .callers import Caller, Callers, Limits, Refusal, Tier, limits
from .config import GatewayConfig, configured_storage, load_config
from .dispatch import GatewayApp
from .estimates import Estimates
from .fleet import (
    BackendFactory,
    BackendPool,
    BackendUnavailable,
    Fleet,
    QueueFull,
    Replica,
    Ticket,
)
from .ledger import Admission, Ledger
from .relay import SseRelay, Used, answer_tokens, usage_total, used_of
from .reload import reloaded_config
from .responses import JSON_TYPE, Errors, stream_error_event
from .schemas import validate_body
from .tenants import Tenants, key_store
from .tokens import request_cost
from .usage import UsageBook

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("quotagate")

_T = TypeVar("_T")

#: A stream's time per token goes to the adaptive controller after this many events, not at
#: its end: a long answer's end is many seconds after the batch it measured (slow start would
#: have doubled the limit past the unloaded batch before any baseline was learnt).
TPOT_EVENTS = 16
#: How often a replica on a shared storage shares the answers it saw and reads back others'.
ESTIMATES_SYNC_S = 1.0


class Gateway:
    """The gateway's state and request pipeline; ``create_app`` wraps it in FastAPI."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        backend: Backend | None = None,
        backends: BackendFactory | None = None,
        storage: Storage | None = None,
        config_path: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides or {}
        self.tenants: Tenants | None = None  # with [admin], from start(): the storage's
        self._apply(config)
        self.limiter = RateLimiter(
            storage if storage is not None else configured_storage(config),
            overlimit_cache=config.storage.overlimit_cache,
        )
        # Given ready-made (tests, embedding): ``backend``, every replica's client (one, for a
        # ``[backend]`` table); ``backends``, what builds a replica's client from its entry and URL.
        make = backends or backend_from_config
        self.fleet = Fleet(config.fleet, make if backend is None else lambda *_: backend)
        self._rank_priorities()
        self.metrics = PrometheusMetrics()
        self.metrics.replicas = self._replica_states
        self.metrics.queues = lambda: [(n, p.gate.queued) for n, p in self.fleet.pools.items()]
        self.ledger = Ledger(self.limiter, self.metrics)
        self.estimates = Estimates()
        self.admin = Admin(self)
        self._probes: set[asyncio.Future[Any]] = set()
        self._sharing: asyncio.Task[None] | None = None

    def _apply(self, config: GatewayConfig) -> None:
        """Take the parts of ``config`` that change without a restart."""
        self.config = config
        self.errors = Errors(config.server.error_format)
        self.callers = Callers(config, self.tenants)
        self.health_rates = parse_rates(config.health.requests)
        self.prices = {model: entry.price for model, entry in config.prices.items()}
        # A lease outlives the longest request a backend allows, so only a crash expires it.
        self.lease_ttl = max(spec.timeout_s for spec in config.fleet) + 30

    def _rank_priorities(self) -> None:
        """Tell each queue the highest tier priority: the one the adaptive headroom is for."""
        top = max((tier.priority for tier in self.callers.tiers.values()), default=0)
        for pool in self.fleet.pools.values():
            pool.gate.top = top

    def _replica_states(self) -> list[ReplicaState]:
        return [
            ReplicaState(pool.name, r.label, r.in_flight, r.serving, r.limit)
            for pool, r in self.fleet.replicas()
        ]

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.callers.tiers

    def reload(self) -> bool:
        """Read the config file again (``kill -HUP``; see ``reload``): returns whether the
        new file was applied."""
        if self.config_path is None:
            logger.warning("quotagate: nothing to reload: running the built-in default config")
            return False
        old = self.config
        new = reloaded_config(self.config_path, self.overrides, old)
        if new is None:
            return False
        self._apply(new)
        self.limiter.limits_changed()
        if new.fleet != old.fleet:
            probes = self.fleet.reload(new.fleet)
            self._probes.add(probes)
            probes.add_done_callback(self._probes.discard)
        self._rank_priorities()
        logger.setLevel(new.log_level.upper())
        logger.info(
            "quotagate: reloaded %s: %d tiers, %d key%s, %s",
            self.config_path,
            len(self.callers.tiers),
            len(self.callers.keys),
            "" if len(self.callers.keys) == 1 else "s",
            self.fleet.describe(),
        )
        return True

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.limiter.start()
        admin = self.config.admin
        if admin is not None:
            storage = self.limiter.storage
            tenants = self.tenants = Tenants(key_store(storage))
            await tenants.start()
            self.callers = Callers(self.config, tenants)
            primary = storage.primary if isinstance(storage, FallbackStorage) else storage
            cluster = bool(getattr(primary, "cluster", False))
            # One clock for keys' expiry and the ledger's days (a test's fake one).
            self.ledger.usage = UsageBook(
                admin.usage_retention_days, lambda: tenants.clock(), cluster=cluster
            )
        await self.fleet.start()
        if not self.limiter.in_process:  # replicas may share it: and what answers cost
            self.estimates.shared = True
            self.estimates.clock = self._storage_clock()
            self._sharing = asyncio.get_running_loop().create_task(self._share_estimates())
        logger.info("%s", self.describe())

    def _storage_clock(self) -> Callable[[], float]:
        """The storage's clock (a test's fake one), which periods and generations go by."""
        clock: Callable[[], float] | None = getattr(self.limiter.storage, "clock", None)
        return clock or time.time

    async def _share_estimates(self) -> None:
        while True:
            await asyncio.sleep(ESTIMATES_SYNC_S)
            try:
                await self.estimates.sync(self.limiter)
            except Exception:  # a bug must not stop the sharing for good; storage errors are
                logger.exception("quotagate: sharing answer estimates failed")  # logged there

    async def aclose(self) -> None:
        await self.ledger.drain()
        if self._sharing is not None:
            self._sharing.cancel()
            await self.estimates.sync(self.limiter)  # what was seen since the last second
        for probes in list(self._probes):  # a reload's first probes, still running
            probes.cancel()
        await self.fleet.aclose()
        if self.tenants is not None:
            await self.tenants.aclose()
        await self.limiter.aclose()

    def describe(self) -> str:
        """The start-up line: version, config, storage, backend, tiers."""
        storage = self.limiter.storage
        where = mask_url(self.config.storage.url)
        version = getattr(storage, "server_version", None)
        if version:
            where += f" (Redis {version})"
        if storage.mode == "fallback":
            where += " [fallback: Redis unreachable]"
        tiers = ", ".join(tier.describe() for tier in self.callers.tiers.values())
        return (
            f"quotagate {__version__} · config {self.config_path or 'built-in default'} · "
            f"storage {where} · {self.fleet.describe()} · tiers {tiers}"
        )

    # -- the inference pipeline ---------------------------------------------------------------

    async def inference(self, request: Request, route: Route) -> Response:
        started = time.perf_counter()
        caller = await self._identify(request)
        if isinstance(caller, Refusal):
            self.metrics.request("none", route, 401)
            return caller.response(self.errors)
        response = await self._inference(request, route, caller)
        self.metrics.request(caller.tier.name, route, response.status_code)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "quotagate: %s %s -> client %s tier %s: %d in %.1f ms",
                request.method,
                request.url.path,
                caller.display,
                caller.tier.name,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
        return response

    async def _identify(self, request: Request) -> Caller | Refusal:
        """The caller; a key the replica's table does not know is asked of the key store."""
        caller = self.callers.identify(request.scope)
        unknown = isinstance(caller, Refusal) and caller.code == "invalid_api_key"
        if unknown and self.tenants is not None:
            return await self.callers.identify_issued(request.scope)
        return caller

    async def _inference(self, request: Request, route: Route, caller: Caller) -> Response:
        read = await read_json(
            request.scope, request.receive, self.config.server.max_body_bytes, self.errors
        )
        if isinstance(read, Response):
            return read
        body, raw = read
        problem = validate_body(route, body)
        if problem is not None:
            param, message = problem
            return self.errors.response(400, "invalid_request", f"{param}: {message}", param=param)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        target = self.fleet.route(model)
        if target is None:
            served = "GET /v1/models lists those served here"
            return self.errors.response(
                404,
                "model_not_found",
                f"No backend serves the model {model!r}: {served}."
                if model is not None
                else f"model: required to choose a backend; {served}.",
                [NO_RETRY],
                param="model",
            )
        if caller.models is not None and model not in caller.models:
            return self.errors.response(
                403,
                "model_not_allowed",
                f"This API key may not use the model {model!r}.",
                [NO_RETRY],
                param="model",
            )
        tier = caller.tier
        price = self.prices.get(model or "") or self.prices.get(target.upstream_model or "")
        if price is None and tier.unpriced == "refuse":
            return self.errors.response(
                400,
                "model_not_priced",
                f"The model {model!r} has no price, and this tier serves only priced models.",
                [NO_RETRY],
                param="model",
            )
        cost = request_cost(route, body, tier.default_max_tokens)
        choices = body.get("n") or 1
        cap = cost.reserved // choices - cost.prompt  # the answer's cap, per choice
        estimated = tier.reserve == "estimate" and choices == 1
        out = cap
        if estimated:  # the answer likely to come, not the whole cap
            likely = self.estimates.p95(caller.client, tier.name, model)
            out = min(cap, tier.default_max_tokens if likely is None else likely)
            cost = cost._replace(reserved=cost.prompt + out)
        money = 0
        if price is not None and tier.budgets:
            prompts = cost.prompt * choices  # as the token reservation counts
            money = price.cost(prompts, cost.reserved - prompts)
        plan = limits(tier, caller.client, model, cost.reserved, self.lease_ttl, money=money)

        decision = await self.ledger.reserve(plan, shadow=tier.shadow, caller=caller, model=model)
        shown, spent = split(decision)
        headers = rate_limit_headers(shown) + openai_headers(shown) + budget_headers(spent)
        if not decision.allowed:
            rejected = self._reject(decision, tier)
            if rejected is not None:
                return rejected
        elif self._fallback_allows():
            self.metrics.unlimited(tier.name)
        self.metrics.tokens(tier.name, "reserved", cost.reserved)
        admission = Admission(
            caller, plan, cost.reserved, cost.prompt, decision, model, price=price, money=money
        )
        left = room(decision, price) if out < cap and decision.allowed and not tier.shadow else None
        if left is not None:
            admission.cap = cap  # held to what it reserved, more reserved as it grows

        pool = target.pool
        replica = await self._gate(admission, headers, pool)
        if not isinstance(replica, Replica):
            return replica
        upstream_body = None if cost.capped else raw  # changed: serialised again
        if admission.allowance is not None and not body.get("stream"):
            # An answer not streamed cannot be held as it grows: what its limits still allow
            # is reserved now and made the model server's own cap on it.
            want = min(cap - out, left or 0)
            if not want or await self.ledger.extend(admission, want) < cap - out:
                field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
                body[field] = admission.allowance
                upstream_body = None
                self._cut(admission, "max_tokens")
        renamed = target.upstream_model != model  # an alias: the upstream's own name goes on
        if renamed:
            body["model"] = target.upstream_model
            upstream_body = None
        if body.get("stream"):
            alias = model if renamed else None
            return await self._stream(
                route, body, upstream_body, admission, headers, pool, replica, alias
            )
        sent = await self._send(
            admission, headers, pool, replica, lambda b: b.complete(route, body, upstream_body)
        )
        if isinstance(sent, Response):
            return sent
        replica, (answer, parsed), took = sent
        self.metrics.upstream(pool.name, replica.label, "ok")
        usage = parsed.get("usage")
        counted = 0 if usage_total(usage) is not None else answer_tokens(parsed)
        used = used_of(usage, cost.prompt, counted)
        if replica.controller is not None and used.completion > 0:
            replica.controller.latency(used.prompt, answer_per_token=took / used.completion)
        await self._finish(admission, pool, replica, used=used)
        if renamed:  # the client sees its own name back
            parsed["model"] = model
            answer = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
        length = (b"content-length", str(len(answer)).encode())
        return RawResponse(200, [*headers, JSON_TYPE, length], answer)

    def _reject(self, decision: Decision, tier: Tier) -> Response | None:
        """The rejection response, or None when the tier is in shadow mode (the engine has
        counted the request all the same)."""
        if decision.reason == "unavailable":
            self.metrics.rejection(tier.name, "storage")
            return self.errors.rejection(decision)
        limit = rejected_limit(decision)
        if tier.shadow:
            self.metrics.shadow_rejection(tier.name, limit)
            return None
        self.metrics.rejection(tier.name, limit)
        shown, spent = split(decision)
        more = openai_headers(shown) + retry_after_ms(decision) + budget_headers(spent)
        if limit == BUDGET:
            return self.errors.rejection(shown, more, **over_budget(decision, tier.budgets))
        return self.errors.rejection(shown, more, limit=limit)

    async def _gate(
        self,
        admission: Admission,
        headers: Headers,
        pool: BackendPool,
        tried: tuple[Replica, ...] = (),
        *,
        again: int = 0,
    ) -> Replica | Response:
        """A slot on a healthy replica within the queue timeout, or the 503 (all given back).
        ``again``: the times the request was sent back by a full model server (it waits at
        the head of the queue for what is left of its queue timeout)."""
        tier = admission.caller.tier
        ticket = Ticket(tier.priority, admission.caller.client, admission.reserved, tier.weight)
        timeout = pool.spec.queue_timeout_ms / 1000
        wait = max(0.0, timeout - admission.queued_s) if again else timeout
        if again:
            pool.gate.redispatch_after(min(1.0, 0.05 * 2 ** (again - 1)))
        queued = time.perf_counter()
        try:
            replica = await pool.acquire(ticket, tried, wait=wait, again=again > 0)
        except BackendUnavailable:
            await self.ledger.undo(admission)
            self.metrics.rejection(tier.name, "backend")
            wait_s = pool.retry_after()
            return self.errors.response(
                503,
                "backend_unavailable",
                f"No replica of the backend {pool.name!r} is reachable. "
                f"Try again in {wait_s} seconds.",
                [*headers, (b"retry-after", str(wait_s).encode())],
                retry_after=wait_s,
            )
        except QueueFull:
            return await self._overloaded(admission, headers, pool, "its queue is full")
        except asyncio.CancelledError:  # the request went away while queued: give back
            self.ledger.background(self.ledger.undo(admission))
            raise
        admission.queued_s += time.perf_counter() - queued
        if replica is None:
            return await self._overloaded(admission, headers, pool, "no slot came in time")
        _set_queue_header(headers, admission.queued_s)
        self.metrics.in_flight(tier.name, 1)
        return replica

    async def _overloaded(
        self, admission: Admission, headers: Headers, pool: BackendPool, why: str
    ) -> Response:
        """503 ``backend_overloaded`` (never 429: that is the client's own quota), with a
        Retry-After from how fast the queue drains; everything the request took given back."""
        tier = admission.caller.tier
        await self.ledger.undo(admission)
        self.metrics.rejection(tier.name, "backend")
        wait = pool.gate.retry_after()
        return self.errors.response(
            503,
            "backend_overloaded",
            f"The model server is at capacity ({why}). Try again in {wait} seconds.",
            [*headers, (b"retry-after", str(wait).encode())],
            retry_after=wait,
        )

    async def _send(
        self,
        admission: Admission,
        headers: Headers,
        pool: BackendPool,
        replica: Replica,
        call: Callable[[Backend], Awaitable[_T]],
    ) -> tuple[Replica, _T, float] | Response:
        """``call`` on the replica; one that could not be reached (so never started the
        request) passes it to another healthy replica, each tried at most once; one that said
        it is full (429, 503) sends it to another replica, or back to the head of the queue,
        within the queue timeout. A failure's response comes back with everything the
        request held given back. The outcome of a call that succeeds is the caller's to count
        (a stream can still fail); with it comes the time it took to its first byte."""
        tried: tuple[Replica, ...] = ()
        full = 0
        while True:
            sent = time.perf_counter()
            try:
                result = await call(replica.backend)
            except UpstreamRejected as exc:
                self.metrics.upstream(pool.name, replica.label, "rejected")
                pool.succeeded(replica)
                await self._finish(admission, pool, replica, used=None)
                return self.errors.upstream(exc, headers)
            except UpstreamFull as exc:
                self.metrics.upstream(pool.name, replica.label, exc.outcome)
                pool.succeeded(replica)
                pool.overloaded(replica)
                self._release(admission, pool, replica)
                full += 1
                others = (*tried, replica)
                exclude = others if pool.gate.healthy(others) else ()
                logger.debug("quotagate: backend %s: %s; queued again", pool.name, exc.message)
                next_replica = await self._gate(admission, headers, pool, exclude, again=full)
                if not isinstance(next_replica, Replica):
                    return next_replica
                replica = next_replica
                continue
            except UpstreamError as exc:
                self.metrics.upstream(pool.name, replica.label, exc.outcome)
                pool.failed(replica, exc)
                elsewhere = pool.checks_health or pool.gate.healthy((*tried, replica))
                if not exc.unsent or not elsewhere:  # started, or nowhere else to go: as it was
                    await self._finish(admission, pool, replica, used=None)
                    return self.errors.upstream(exc, headers)
                logger.debug("quotagate: backend %s: %s; failing over", pool.name, exc.message)
                self.metrics.failover(pool.name, replica.label)
                self._release(admission, pool, replica)
                tried += (replica,)
                next_replica = await self._gate(admission, headers, pool, tried)
                if not isinstance(next_replica, Replica):
                    return next_replica
                replica = next_replica
                continue
            except BaseException:
                await self._finish(admission, pool, replica, used=None)
                raise
            first_byte = time.perf_counter() - sent
            self.metrics.first_byte(pool.name, replica.label, first_byte)
            pool.succeeded(replica)
            return replica, result, first_byte

    def _fallback_allows(self) -> bool:
        storage = self.limiter.storage
        return (
            isinstance(storage, FallbackStorage)
            and storage.mode == "fallback"
            and storage.policy == "allow"
        )

    def _release(self, admission: Admission, pool: BackendPool, replica: Replica) -> None:
        pool.release(replica)
        self.metrics.in_flight(admission.caller.tier.name, -1)

    async def _finish(
        self,
        admission: Admission,
        pool: BackendPool,
        replica: Replica,
        *,
        used: Used | None,
        upstream: AsyncGenerator[bytes, None] | None = None,
    ) -> None:
        """Give the replica's slot back, then settle (see ``ledger``) on ``used``, or give
        everything back when the request was not served (None); a stream's upstream is closed
        first, so the model server stops generating."""
        self._release(admission, pool, replica)
        caller = admission.caller
        if used is not None and caller.tier.reserve == "estimate":
            self.estimates.add(caller.client, caller.tier.name, admission.model, used.completion)
        await self.ledger.settle(
            admission, used, None if upstream is None else lambda: _close(upstream)
        )

    def _cut(self, admission: Admission, how: str) -> None:
        """An answer held to what its client's limits still allow: counted and logged."""
        caller = admission.caller
        self.metrics.cut(caller.tier.name, how)
        logger.info(
            "quotagate: %s held to %d tokens (%s): what its limits still allow",
            caller.key_id or caller.display,
            admission.allowance,
            "the stream ended" if how == "stream" else "max_tokens upstream",
        )

    async def _stream(
        self,
        route: Route,
        body: dict[str, Any],
        raw: bytes | None,
        admission: Admission,
        headers: Headers,
        pool: BackendPool,
        replica: Replica,
        client_model: str | None,
    ) -> Response:
        """``client_model``: the alias the client sent, put back in every event."""
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not client_wants_usage:
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            raw = None

        async def open_stream(backend: Backend) -> tuple[AsyncGenerator[bytes, None], bytes]:
            events = backend.stream(route, body, raw)
            try:
                return events, await anext(events)
            except StopAsyncIteration:
                return events, b""

        sent = await self._send(admission, headers, pool, replica, open_stream)
        if isinstance(sent, Response):
            return sent
        replica, (events, first), first_byte = sent
        streaming = time.perf_counter()
        relay = SseRelay(admission.prompt, client_wants_usage, admission.allowance, admission.cap)
        if client_model is not None:
            relay.rename(str(body["model"]), client_model)

        controller = replica.controller

        async def held(out: list[bytes]) -> list[bytes]:
            """``out``, and the events a hold kept back once more is reserved (doubling what
            the answer holds, up to its cap) or the stream's end when nothing more can be."""
            while relay.held:
                assert relay.limit is not None
                more = await self.ledger.extend(
                    admission, min(admission.cap - relay.limit, max(relay.limit, 16))
                )
                out += relay.grow(more) if more else relay.end()
            return out

        async def body_iterator() -> AsyncIterator[bytes]:
            # The events of one upstream read go out in one write, not one write each.
            outcome = "ok"  # a client that leaves mid-stream is no fault of the replica's
            timed = controller is None  # its time per token is told early, once
            events_seen = 0
            try:
                if out := await held(relay.feed(first)):
                    yield b"".join(out)
                async for chunk in events:
                    if relay.cut:
                        break  # ended for the client: the upstream is closed as it settles
                    if out := await held(relay.feed(chunk)):
                        if not timed:
                            events_seen += len(out)
                            if events_seen >= TPOT_EVENTS:
                                per_token = (time.perf_counter() - streaming) / events_seen
                                assert controller is not None
                                controller.latency(admission.prompt, tpot=per_token)
                                timed = True
                        yield b"".join(out)
                        if relay.cut:
                            break
                if not relay.cut and (out := await held(relay.flush())):
                    yield b"".join(out)
                if relay.cut:
                    self._cut(admission, "stream")
            except UpstreamError as exc:
                outcome = exc.outcome
                pool.failed(replica, exc)
                yield stream_error_event(exc)
            finally:
                self.metrics.upstream(pool.name, replica.label, outcome)
                used = relay.used()
                if controller is not None and outcome == "ok":
                    rest = used.completion - 1
                    tpot = (time.perf_counter() - streaming) / rest if rest > 0 else None
                    controller.latency(used.prompt, ttft=first_byte, tpot=None if timed else tpot)
                await self._finish(admission, pool, replica, used=used, upstream=events)

        response = StreamingResponse(body_iterator(), media_type="text/event-stream")
        response.raw_headers.extend(headers)
        response.raw_headers.append((b"cache-control", b"no-cache"))
        return response

    # -- the other endpoints -------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        client = self.callers.identify(request.scope).client
        hit = Hit(client_state_key(client, HEALTH), self.health_rates, name=HEALTH)
        decision = await self.ledger.reserve(Limits([hit], [], None, []))
        # A health check reports the storage; it is not denied because the storage is down.
        if not decision.allowed and decision.reason != "unavailable":
            self.metrics.request("none", "health", 429)
            self.metrics.rejection("none", "health")
            return self.errors.rejection(decision, retry_after_ms(decision), limit=HEALTH)
        self.metrics.request("none", "health", 200)
        backends = self.fleet.state()
        degraded = any(state["healthy"] == 0 for state in backends.values())
        response = JSONResponse(
            {
                "status": "degraded" if degraded else "ok",
                "storage": self.limiter.storage.mode,
                "version": __version__,
                "backends": backends,
            }
        )
        response.raw_headers.extend(rate_limit_headers(decision))
        return response

    async def ratelimit(self, request: Request) -> Response:
        caller = await self._identify(request)
        if isinstance(caller, Refusal):
            return caller.response(self.errors)
        tier = caller.tier
        decision = await self.ledger.reserve(limits(tier, caller.client, None, 0, 0, read=True))
        shown, spent = split(decision)
        described = [
            {
                "name": state.name,
                "rate": None if state.rate is None else str(state.rate),
                "limit": state.limit,
                "remaining": state.remaining,
                "reset_after": 0.0 if state.rate is None else round(state.reset_after, 3),
            }
            for state in shown.states
        ]
        answer: dict[str, Any] = {"tier": tier.name, "client": caller.display, "limits": described}
        if spent:
            answer["budgets"] = describe_budgets(spent, tier.budgets, self._storage_clock()())
        self.metrics.request(tier.name, "ratelimit", 200)
        return JSONResponse(answer)

    async def models(self) -> Response:
        try:
            data = await self.fleet.models()
        except UpstreamError as exc:
            return self.errors.response(exc.status, exc.error, exc.message)
        return JSONResponse({"object": "list", "data": data})

    def render_metrics(self) -> Response:
        self.metrics.storage_mode(self.limiter.storage.mode)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _set_queue_header(headers: Headers, seconds: float) -> None:
    """``x-quotagate-queue-ms``: what the request waited for a slot, in all."""
    value = (b"x-quotagate-queue-ms", str(round(seconds * 1000)).encode())
    for i, (name, _) in enumerate(headers):
        if name == b"x-quotagate-queue-ms":
            headers[i] = value
            return
    headers.append(value)


async def _close(upstream: AsyncGenerator[bytes, None]) -> None:
    """Stop the upstream generating; frees its connection."""
    try:
        await upstream.aclose()
    except Exception as exc:
        logger.debug("quotagate: closing the upstream stream: %r", exc)


def create_app(
    config: GatewayConfig | None = None,
    *,
    backend: Backend | None = None,
    backends: BackendFactory | None = None,
    storage: Storage | None = None,
    config_path: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> FastAPI:
    """The gateway as a FastAPI app (``quotagate serve`` runs this under uvicorn).

    ``overrides``: the command line's flags, which a reload keeps above the file.
    """
    gateway = Gateway(
        config or load_config(),
        backend=backend,
        backends=backends,
        storage=storage,
        config_path=config_path,
        overrides=overrides,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        loop = asyncio.get_running_loop()
        try:  # SIGHUP reloads; only a main thread's loop can take signals
            loop.add_signal_handler(signal.SIGHUP, gateway.reload)
            hup = True
        except (NotImplementedError, RuntimeError, ValueError):
            hup = False
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await gateway.aclose()

    app = GatewayApp(
        gateway,
        title="quotagate",
        version=__version__,
        description="OpenAI-compatible rate-limiting gateway for LLM inference servers.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app

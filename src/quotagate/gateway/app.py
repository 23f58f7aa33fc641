"""``quotagate serve``: an OpenAI-compatible gateway that rate limits in front of a model server.

Per request: who is calling (API key or anonymous IP) -> which tier -> ONE storage call that
checks requests, tokens (prompt estimate + output cap, times n) and a concurrency lease, all or
nothing -> the whole-backend gate, ordered by tier priority -> the model -> settle tokens on the
real usage, release the lease. Every step that can fail answers with a precise status and a JSON
error; nothing is left reserved or held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..asgi import RawResponse
from ..decision import Decision, LimitState
from ..errors import ConfigError, StorageError
from ..http import Headers, rate_limit_headers, rejection
from ..identity import (
    TrustedProxies,
    bearer_or_header_key,
    hash_api_key,
    key_client_id,
    mask_key,
)
from ..limiter import Acquire, Hit, RateLimiter, most_restrictive
from ..metrics import CONTENT_TYPE_LATEST, PrometheusMetrics
from ..rates import Rate, parse_rates
from ..storage import FallbackStorage, Storage, mask_url
from .backends import Backend, Route, UpstreamError, UpstreamRejected
from .backends.mock import MockBackend
from .backends.openai import OpenAIBackend
from .config import GatewayConfig, KeyConfig, TierConfig, configured_storage, load_config
from .gate import BackendGate
from .schemas import REQUEST_SCHEMAS, validate_body
from .tokens import count_tokens, output_cap, prompt_tokens

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("quotagate")

#: ``[server]`` fields the listening socket is built with: a reload cannot change them.
_RESTART_SERVER_FIELDS = (
    "host",
    "port",
    "max_header_bytes",
    "request_timeout_s",
    "cors_allow_origins",
    "tls_certfile",
    "tls_keyfile",
)


@dataclass(frozen=True, slots=True)
class _Tier:
    name: str
    requests: tuple[Rate, ...] | None
    tokens: tuple[Rate, ...] | None
    concurrency: int | None
    priority: int
    default_max_tokens: int
    shadow: bool
    model_requests: dict[str, tuple[Rate, ...]]
    model_tokens: dict[str, tuple[Rate, ...]]

    @classmethod
    def from_config(cls, name: str, tier: TierConfig, shadow: bool) -> _Tier:
        return cls(
            name=name,
            requests=parse_rates(tier.requests) if tier.requests else None,
            tokens=parse_rates(tier.tokens) if tier.tokens else None,
            concurrency=tier.concurrency,
            priority=tier.priority,
            default_max_tokens=tier.default_max_tokens,
            shadow=shadow or tier.shadow,
            model_requests={
                m: parse_rates(v.requests) for m, v in tier.models.items() if v.requests
            },
            model_tokens={m: parse_rates(v.tokens) for m, v in tier.models.items() if v.tokens},
        )


@dataclass(frozen=True, slots=True)
class _Caller:
    tier: _Tier
    client: str  # ``key:<hash>`` or ``ip:<address>``: goes in the hash tag of every key
    display: str  # masked, for logs


@dataclass(slots=True)
class _Admission:
    """What an admitted request holds until it is settled."""

    caller: _Caller
    token_hits: list[Hit]
    reserved: int
    prompt: int
    decision: Decision


def _error(
    status: int, error: str, message: str, headers: Headers | None = None, **extra: Any
) -> Response:
    body = {"error": error, "message": message, **extra}
    response = JSONResponse(body, status_code=status)
    if headers:
        response.raw_headers.extend(headers)
    return response


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1h0m0s"``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _kind(state: LimitState) -> str:
    """Which of a tier's limits a state belongs to: requests, tokens or concurrency."""
    if state.rate is None:
        return "concurrency"
    part = state.key.rsplit("}:", 1)[-1]
    return "tokens" if part.startswith(("tok", "mtok")) else "requests"


_OPENAI_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}".encode(),
        f"x-ratelimit-remaining-{kind}".encode(),
        f"x-ratelimit-reset-{kind}".encode(),
    )
    for kind in ("requests", "tokens")
}


def _openai_headers(decision: Decision) -> Headers:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` as OpenAI sends them."""
    by_kind: dict[str, list[LimitState]] = {"requests": [], "tokens": []}
    for state in decision.states:
        if state.rate is not None:
            by_kind[_kind(state)].append(state)
    headers: Headers = []
    for kind, states in by_kind.items():
        pick = states[0] if len(states) == 1 else most_restrictive(states)
        if pick is None:
            continue
        limit, remaining, reset = _OPENAI_NAMES[kind]
        headers += [
            (limit, b"%d" % pick.limit),
            (remaining, b"%d" % pick.remaining),
            (reset, format_duration(pick.reset_after).encode()),
        ]
    return headers


class Gateway:
    """The gateway's state and request pipeline; ``create_app`` wraps it in FastAPI."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        backend: Backend | None = None,
        storage: Storage | None = None,
        config_path: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides or {}
        self._apply(config)
        if storage is None:
            storage = configured_storage(config)
        self.limiter = RateLimiter(storage, overlimit_cache=config.storage.overlimit_cache)
        if backend is None:
            b = config.backend
            if b.kind == "mock":
                backend = MockBackend(b.mock_tokens_per_second)
            else:
                backend = OpenAIBackend.from_env(
                    b.url or "",
                    b.api_key_env,
                    timeout=b.timeout_s,
                    connect_timeout=b.connect_timeout_s,
                    max_connections=b.max_concurrency * 2,
                )
        self.backend: Backend = backend
        self.gate = BackendGate(config.backend.max_concurrency)
        self.metrics = PrometheusMetrics()
        self.lease_ttl = config.backend.timeout_s + 30
        self._tasks: set[asyncio.Task[None]] = set()

    def _apply(self, config: GatewayConfig) -> None:
        """Take the parts of ``config`` that change without a restart."""
        self.config = config
        self.tiers = {
            name: _Tier.from_config(name, tier, config.shadow)
            for name, tier in config.tiers.items()
        }
        self.keys: dict[str, KeyConfig] = {key.digest: key for key in config.keys}
        self.anonymous = self.tiers[config.anonymous.tier] if config.anonymous else None
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        self.health_rates = parse_rates(config.health.requests)
        # Configured keys seen on the wire -> their caller: saves a SHA-256 per request.
        self._known: dict[str, _Caller] = {}

    def reload(self) -> bool:
        """Read the config file again (``kill -HUP``): keys, tiers, anonymous access, health
        limit, shadow mode, trusted proxies, the body limit and the log level change at once,
        for the requests that follow. What the running process is built on (storage, backend,
        the listening socket and its bounds) needs a restart: kept, with a warning naming it.
        A file that does not validate changes nothing. Returns whether it was applied."""
        if self.config_path is None:
            logger.warning("quotagate: nothing to reload: running the built-in default config")
            return False
        try:
            new = load_config(self.config_path, overrides=self.overrides)
        except ConfigError as exc:
            logger.error(
                "quotagate: %s not reloaded, the running config stays:\n%s", self.config_path, exc
            )
            return False
        old = self.config
        server = new.server.model_copy(
            update={name: getattr(old.server, name) for name in _RESTART_SERVER_FIELDS}
        )
        kept = [
            f"server.{name}"
            for name in _RESTART_SERVER_FIELDS
            if getattr(new.server, name) != getattr(old.server, name)
        ]
        kept += [
            name for name in ("storage", "backend") if getattr(new, name) != getattr(old, name)
        ]
        if kept:
            logger.warning(
                "quotagate: %s changed, which needs a restart: the running value is kept",
                ", ".join(kept),
            )
        self._apply(
            new.model_copy(
                update={"server": server, "storage": old.storage, "backend": old.backend}
            )
        )
        logger.setLevel(new.log_level.upper())
        logger.info(
            "quotagate: reloaded %s: %d tiers, %d keys",
            self.config_path,
            len(self.tiers),
            len(self.keys),
        )
        return True

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.limiter.start()
        await self.backend.start()
        logger.info("%s", self.describe())

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.aclose()
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
        backend = self.backend.kind + (f" {self.backend.url}" if self.backend.url else "")
        tiers = ", ".join(
            f"{t.name}[{_rates_text(t.requests)} req, {_rates_text(t.tokens)} tok, "
            f"{t.concurrency or '∞'} conc]"
            for t in self.tiers.values()
        )
        return (
            f"quotagate {__version__} · config {self.config_path or 'built-in default'} · "
            f"storage {where} · backend {backend} · tiers {tiers}"
        )

    # -- who is calling --------------------------------------------------------------------

    def identify(self, request: Request) -> _Caller | Response:
        api_key = bearer_or_header_key(request.scope)
        if api_key:
            caller = self._known.get(api_key)
            if caller is not None:
                return caller
            digest = hash_api_key(api_key)
            key = self.keys.get(digest)
            if key is None:
                return _error(401, "invalid_api_key", "The API key is not valid.")
            caller = _Caller(self.tiers[key.tier], key_client_id(digest), mask_key(api_key))
            if len(self._known) < 4 * len(self.keys):  # configured keys only: bounded
                self._known[api_key] = caller
            return caller
        if self.anonymous is None:
            return _error(
                401,
                "missing_api_key",
                "An API key is required: send X-API-Key or Authorization: Bearer <key>.",
            )
        host = self.trusted.client_host(request.scope)
        return _Caller(self.anonymous, "ip:" + host, "ip:" + host)

    # -- the inference pipeline ---------------------------------------------------------------

    async def inference(self, request: Request, route: Route) -> Response:
        started = time.perf_counter()
        caller = self.identify(request)
        if isinstance(caller, Response):
            self.metrics.request("none", route, caller.status_code)
            return caller
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

    async def _inference(self, request: Request, route: Route, caller: _Caller) -> Response:
        read = await self._read_json(request)
        if isinstance(read, Response):
            return read
        body: dict[str, Any] = read[0]
        raw: bytes | None = read[1]
        problem = validate_body(route, body)
        if problem is not None:
            param, message = problem
            return _error(400, "invalid_request", f"{param}: {message}", param=param)
        tier = caller.tier
        cap = output_cap(body)
        if cap is None:
            # Inject the tier's cap upstream so the reservation is a true upper bound.
            body["max_tokens"] = cap = tier.default_max_tokens
            raw = None  # changed: serialise again
        prompt = prompt_tokens(route, body)
        reserved = (prompt + cap) * (body.get("n") or 1)
        model = body.get("model") if isinstance(body.get("model"), str) else None

        client = "{" + caller.client + "}"
        hits: list[Hit] = []
        token_hits: list[Hit] = []
        if tier.requests:
            hits.append(Hit(client + ":req", tier.requests))
        if tier.tokens:
            token_hits.append(Hit(client + ":tok", tier.tokens, reserved))
        if model is not None and model in tier.model_requests:
            hits.append(Hit(f"{client}:mreq:{model}", tier.model_requests[model]))
        if model is not None and model in tier.model_tokens:
            token_hits.append(Hit(f"{client}:mtok:{model}", tier.model_tokens[model], reserved))
        hits += token_hits
        acquire = (
            Acquire(client + ":conc", tier.concurrency, self.lease_ttl)
            if tier.concurrency
            else None
        )

        decision = await self._decide(hits, acquire)
        headers = rate_limit_headers(decision) + _openai_headers(decision)
        admission = _Admission(caller, token_hits, reserved, prompt, decision)
        if not decision.allowed:
            rejected = self._reject(decision, tier, hits)
            if rejected is not None:
                return rejected
            await self._charge_shadow(hits)  # shadow: admitted, and counted all the same
        elif self._fallback_allows():
            self.metrics.unlimited(tier.name)
        self.metrics.tokens(tier.name, "reserved", reserved)

        try:
            admitted = await self.gate.acquire(
                tier.priority, self.config.backend.queue_timeout_ms / 1000
            )
        except asyncio.CancelledError:  # the request went away while queued: give back
            self._background(self._undo(admission, requests=hits))
            raise
        if not admitted:
            await self._undo(admission, requests=hits)
            self.metrics.rejection(tier.name, "backend")
            return _error(
                503,
                "backend_overloaded",
                "The model server is at capacity. Try again in 1 seconds.",
                [*headers, (b"retry-after", b"1")],
                retry_after=1,
            )
        self.metrics.in_flight(tier.name, 1)
        if body.get("stream"):
            return await self._stream(route, body, raw, admission, headers)
        try:
            answer, parsed = await self.backend.complete(route, body, raw)
        except (UpstreamError, UpstreamRejected) as exc:
            await self._finish(admission, charged=0)
            return _upstream_response(exc, headers)
        except BaseException:
            await self._finish(admission, charged=0)
            raise
        charged = _usage_total(parsed.get("usage"))
        if charged is None:
            charged = prompt + _answer_tokens(parsed)
        await self._finish(admission, charged=charged)
        length = (b"content-length", str(len(answer)).encode())
        return RawResponse(200, [*headers, _JSON, length], answer)

    async def _decide(self, hits: list[Hit], acquire: Acquire | None) -> Decision:
        started = time.perf_counter()
        try:
            return await self.limiter.hit_many(hits, acquire=acquire)
        except StorageError as exc:  # no fallback configured: a clear 503, never a 500
            logger.error("quotagate: storage error: %s", exc)
            return Decision(False, "unavailable", 1.0, 0, 0, 0.0, ())
        finally:
            self.metrics.decision_seconds(time.perf_counter() - started)

    def _reject(self, decision: Decision, tier: _Tier, hits: list[Hit]) -> Response | None:
        """The rejection response, or None when the tier is in shadow mode."""
        if decision.reason == "unavailable":
            self.metrics.rejection(tier.name, "storage")
            status, headers, body = rejection(decision)
            return RawResponse(status, headers, body)
        pick = _rejecting_state(decision)
        kind = _kind(pick) if pick is not None else "requests"
        if tier.shadow:
            self.metrics.shadow_rejection(tier.name, kind)
            return None
        self.metrics.rejection(tier.name, kind)
        status, headers, body = rejection(decision, {"limit": kind})
        headers += _openai_headers(decision)
        if decision.reason != "too_large":
            headers.append(
                (b"retry-after-ms", str(math.ceil(decision.retry_after * 1000)).encode())
            )
        return RawResponse(status, headers, body)

    async def _charge_shadow(self, hits: list[Hit]) -> None:
        """Shadow mode admits what the limits reject; count it anyway (not clamped)."""
        for hit in hits:
            try:
                await self.limiter.adjust(hit.key, hit.rates, hit.cost)
            except StorageError as exc:
                logger.error("quotagate: storage error while charging a shadow request: %s", exc)

    def _fallback_allows(self) -> bool:
        storage = self.limiter.storage
        return (
            isinstance(storage, FallbackStorage)
            and storage.mode == "fallback"
            and storage.policy == "allow"
        )

    async def _undo(self, admission: _Admission, requests: list[Hit]) -> None:
        """A request admitted but never served (backend full): give back all it took."""
        for hit in requests:
            await self._adjust(hit, -hit.cost)
        if admission.decision.lease is not None:
            await self._release(admission)

    async def _finish(
        self,
        admission: _Admission,
        *,
        charged: int,
        upstream: AsyncGenerator[bytes, None] | None = None,
    ) -> None:
        """Settle tokens on what was really used, release the lease and the backend slot.

        Settling runs in a task of its own and is awaited through a shield: it completes even
        when the request's task is cancelled (a client that went away mid-stream), and a
        client that waits for the response never finds its slot still held.
        """
        self.gate.release()
        self.metrics.in_flight(admission.caller.tier.name, -1)
        if self.limiter.in_process and upstream is None:
            await self._settle(admission, charged, None)
            return
        await asyncio.shield(self._background(self._settle(admission, charged, upstream)))

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` to the end even if the request's task is cancelled; kept until done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(
        self, admission: _Admission, charged: int, upstream: AsyncGenerator[bytes, None] | None
    ) -> None:
        if upstream is not None:
            try:
                await upstream.aclose()  # stop generating; frees the upstream connection
            except Exception as exc:
                logger.debug("quotagate: closing the upstream stream: %r", exc)
        tier = admission.caller.tier.name
        delta = charged - admission.reserved
        if delta:
            for hit in admission.token_hits:
                await self._adjust(hit, delta)
        self.metrics.tokens(tier, "charged", charged)
        self.metrics.tokens(tier, "refunded", -delta)
        if admission.decision.lease is not None:
            await self._release(admission)

    async def _adjust(self, hit: Hit, delta: int) -> None:
        try:
            await self.limiter.adjust(hit.key, hit.rates, delta)
        except StorageError as exc:
            logger.error(
                "quotagate: storage error while settling %+d on %s: %s", delta, hit.key, exc
            )

    async def _release(self, admission: _Admission) -> None:
        lease = admission.decision.lease
        if lease is None:
            return
        try:
            await self.limiter.release(lease)
        except StorageError as exc:
            logger.error("quotagate: storage error while releasing a lease (it expires): %s", exc)

    async def _stream(
        self,
        route: Route,
        body: dict[str, Any],
        raw: bytes | None,
        admission: _Admission,
        headers: Headers,
    ) -> Response:
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not client_wants_usage:
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            raw = None
        events = self.backend.stream(route, body, raw)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = b""
        except (UpstreamError, UpstreamRejected) as exc:
            await self._finish(admission, charged=0)
            return _upstream_response(exc, headers)
        except BaseException:
            await self._finish(admission, charged=0)
            raise
        relay = _SseRelay(admission.prompt, client_wants_usage)

        async def body_iterator() -> AsyncIterator[bytes]:
            # The events of one upstream read go out in one write, not one write each.
            try:
                if out := relay.feed(first):
                    yield b"".join(out)
                async for chunk in events:
                    if out := relay.feed(chunk):
                        yield b"".join(out)
                if out := relay.flush():
                    yield b"".join(out)
            except UpstreamError as exc:
                logger.warning("quotagate: model server failed mid-stream: %s", exc.message)
                error = {"error": {"message": exc.message, "type": exc.error, "code": exc.status}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
            finally:
                await self._finish(admission, charged=relay.charged(), upstream=events)

        response = StreamingResponse(body_iterator(), media_type="text/event-stream")
        response.raw_headers.extend(headers)
        response.raw_headers.append((b"cache-control", b"no-cache"))
        return response

    async def _read_json(self, request: Request) -> tuple[dict[str, Any], bytes] | Response:
        """The body as a JSON object, and its bytes."""
        limit = self.config.server.max_body_bytes
        for name, value in request.scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    return _error(413, "body_too_large", f"The request body exceeds {limit} bytes.")
                break
        chunks: list[bytes] = []
        size = 0
        receive = request.receive
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # stop reading: never hold more than the limit in memory
                return _error(413, "body_too_large", f"The request body exceeds {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            text = raw.decode("utf-8")
            body = _DECODER.decode(text)
            if "\\u" in text:
                # JSON may escape lone surrogates that no UTF-8 can carry on to the upstream.
                json.dumps(body, ensure_ascii=False).encode()
        except UnicodeDecodeError as exc:
            return _error(400, "invalid_json", f"The body is not UTF-8: {exc}")
        except (ValueError, RecursionError) as exc:
            return _error(400, "invalid_json", f"The body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "invalid_json", "The body must be a JSON object.")
        return body, raw

    # -- the other endpoints -------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        api_key = bearer_or_header_key(request.scope)
        digest = hash_api_key(api_key) if api_key else None
        if digest is not None and digest in self.keys:
            client = key_client_id(digest)
        else:
            client = "ip:" + self.trusted.client_host(request.scope)
        decision = await self._decide([Hit("{" + client + "}:health", self.health_rates)], None)
        # A health check reports the storage; it is not denied because the storage is down.
        if not decision.allowed and decision.reason != "unavailable":
            self.metrics.request("none", "health", 429)
            self.metrics.rejection("none", "health")
            status, headers, body = rejection(decision, {"limit": "health"})
            if decision.reason != "too_large":
                headers.append(
                    (b"retry-after-ms", str(math.ceil(decision.retry_after * 1000)).encode())
                )
            return RawResponse(status, headers, body)
        self.metrics.request("none", "health", 200)
        response = JSONResponse(
            {"status": "ok", "storage": self.limiter.storage.mode, "version": __version__}
        )
        response.raw_headers.extend(rate_limit_headers(decision))
        return response

    async def ratelimit(self, request: Request) -> Response:
        caller = self.identify(request)
        if isinstance(caller, Response):
            return caller
        tier = caller.tier
        client = "{" + caller.client + "}"
        named: list[tuple[str, Hit]] = []
        if tier.requests:
            named.append(("requests", Hit(client + ":req", tier.requests, 0)))
        if tier.tokens:
            named.append(("tokens", Hit(client + ":tok", tier.tokens, 0)))
        acquire = Acquire(client + ":conc", tier.concurrency, 0) if tier.concurrency else None
        decision = await self._decide([hit for _, hit in named], acquire)
        limits: list[dict[str, Any]] = []
        states = iter(decision.states)
        for name, hit in named:
            for rate in hit.rates:  # type: ignore[union-attr]
                state = next(states)
                limits.append(
                    {
                        "name": name,
                        "rate": str(rate),
                        "limit": state.limit,
                        "remaining": state.remaining,
                        "reset_after": round(state.reset_after, 3),
                    }
                )
        if acquire is not None:
            state = next(states)
            limits.append(
                {
                    "name": "concurrency",
                    "rate": None,
                    "limit": state.limit,
                    "remaining": state.remaining,
                    "reset_after": 0.0,
                }
            )
        self.metrics.request(tier.name, "ratelimit", 200)
        return JSONResponse({"tier": tier.name, "client": caller.display, "limits": limits})

    async def models(self) -> Response:
        try:
            data = await self.backend.models()
        except UpstreamError as exc:
            return _error(exc.status, exc.error, exc.message)
        return JSONResponse({"object": "list", "data": data})

    def render_metrics(self) -> Response:
        self.metrics.storage_mode(self.limiter.storage.mode)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class _SseRelay:
    """Re-frames a Server-Sent Events stream: counts generated text, picks up the usage chunk,
    and drops that chunk when only the gateway asked for it."""

    def __init__(self, prompt: int, client_wants_usage: bool) -> None:
        self.prompt = prompt
        self.client_wants_usage = client_wants_usage
        self.generated = 0
        self.usage_total: int | None = None
        self._buffer = b""

    def charged(self) -> int:
        return self.usage_total if self.usage_total is not None else self.prompt + self.generated

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [out for event in events if (out := self._event(event)) is not None]

    def flush(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        out = self._event(rest) if rest.strip() else None
        return [out] if out is not None else []

    def _event(self, event: bytes) -> bytes | None:
        data = b"".join(
            line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if data and data != b"[DONE]":
            try:
                payload = json.loads(data)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                usage_total = _usage_total(payload.get("usage"))
                if usage_total is not None:
                    self.usage_total = usage_total
                choices = payload.get("choices")
                if isinstance(choices, list):
                    for choice in choices:
                        self.generated += _choice_tokens(choice, "delta")
                    if not choices and usage_total is not None and not self.client_wants_usage:
                        return None
        return event + b"\n\n"


def _reject_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259); Python's parser would take them."""
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one, not one per request


def _choice_tokens(choice: Any, field: str) -> int:
    if not isinstance(choice, dict):
        return 0
    text = choice.get("text")
    if isinstance(text, str):
        return count_tokens(text)
    message = choice.get(field) or choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return count_tokens(message["content"])
    return 0


def _answer_tokens(answer: dict[str, Any]) -> int:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return 0
    return sum(_choice_tokens(choice, "message") for choice in choices)


def _usage_total(usage: Any) -> int | None:
    if isinstance(usage, dict):
        total = usage.get("total_tokens")
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            return total
    return None


def _rejecting_state(decision: Decision) -> LimitState | None:
    """The state that forced the longest wait (the one the 429 names)."""
    candidates = [s for s in decision.states if s.retry_after > 0]
    return max(candidates, key=lambda s: s.retry_after) if candidates else None


_JSON = (b"content-type", b"application/json")


def _upstream_response(exc: UpstreamError | UpstreamRejected, headers: Headers) -> Response:
    if isinstance(exc, UpstreamRejected):
        response = Response(exc.body, status_code=exc.status, media_type=exc.content_type)
        response.raw_headers.extend(headers)
        return response
    logger.warning("quotagate: %s", exc.message)
    return _error(exc.status, exc.error, exc.message, headers)


def _rates_text(rates: tuple[Rate, ...] | None) -> str:
    return "; ".join(str(rate) for rate in rates) if rates else "∞"


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}

_INFERENCE: dict[str, Route] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


#: Response headers a page's code may read across origins (CORS): the rate-limit contract.
_CORS_EXPOSED = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
    "retry-after",
    "retry-after-ms",
    *(name.decode() for names in _OPENAI_NAMES.values() for name in names),
]


class _GatewayApp(FastAPI):
    """FastAPI for everything but the two inference routes, which go straight to the gateway.

    Why: FastAPI's middleware stack, routing and dependency solving cost about a fifth of a
    proxied request's CPU, on the one path where every microsecond is taken from the model
    server's clients. The routes stay declared for ``/docs`` and ``/openapi.json``; a method
    other than POST falls through to FastAPI (405).
    """

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway
        origins = gateway.config.server.cors_allow_origins
        # Browsers calling the gateway directly: preflights answered, and the rate-limit
        # headers readable by the page's code (so it can pace itself). Around everything.
        self._entry: Callable[[Scope, Receive, Send], Awaitable[None]] = (
            CORSMiddleware(
                self._dispatch,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=_CORS_EXPOSED,
                max_age=600,
            )
            if origins
            else self._dispatch
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _INFERENCE.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        try:
            response = await self.gateway.inference(Request(scope, receive), route)
        except ClientDisconnect:
            return  # the client went away: nobody to answer (what it held is settled)
        except Exception:
            logger.exception("quotagate: unexpected error on %s", scope["path"])
            response = _error(500, "internal_error", "The gateway failed; see its log.")
        try:
            await response(scope, receive, send)
        except ClientDisconnect:
            return


def create_app(
    config: GatewayConfig | None = None,
    *,
    backend: Backend | None = None,
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

    app = _GatewayApp(
        gateway,
        title="quotagate",
        version=__version__,
        description="OpenAI-compatible rate-limiting gateway for LLM inference servers.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """404, 405 and the like in the gateway's error shape, not FastAPI's ``{"detail"}``."""
        error = _HTTP_ERRORS.get(exc.status_code, "http_error")
        response = _error(
            exc.status_code, error, f"{exc.detail}: {request.method} {request.url.path}"
        )
        if exc.headers:
            response.headers.update(exc.headers)  # Allow, on a 405
        return response

    def inference_route(route: Route) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await gateway.inference(request, route)

        return endpoint

    app.add_api_route(
        "/v1/chat/completions",
        inference_route("chat"),
        methods=["POST"],
        summary="Chat completion (OpenAI-compatible), rate limited",
        openapi_extra=REQUEST_SCHEMAS["chat"],
        response_class=JSONResponse,
    )
    app.add_api_route(
        "/v1/completions",
        inference_route("completions"),
        methods=["POST"],
        summary="Text completion (OpenAI-compatible), rate limited",
        openapi_extra=REQUEST_SCHEMAS["completions"],
        response_class=JSONResponse,
    )

    @app.get("/v1/models", summary="Models served behind the gateway")
    async def models() -> Response:
        return await gateway.models()

    @app.get("/v1/ratelimit", summary="The caller's tier and the state of each of its limits")
    async def ratelimit(request: Request) -> Response:
        return await gateway.ratelimit(request)

    @app.get("/health", summary="Liveness, storage mode and version")
    async def health(request: Request) -> Response:
        return await gateway.health(request)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics() -> Response:
        return gateway.render_metrics()

    return app

"""Pure ASGI middleware (Starlette's ``trustedhost.py`` / ``cors.py`` are the model).

``RateLimitMiddleware`` limits any ASGI app by route rules, no decorators needed; the fastapi
module's ``Limiter.init_app`` installs a middleware of its own. Both add the headers by
wrapping ``send`` at ``http.response.start``, so success, error, 429 and streaming responses all
carry them; non-HTTP scopes pass straight through. Never ``BaseHTTPMiddleware``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .decision import Decision
from .errors import ConfigError, StorageError
from .http import Headers, rate_limit_headers, rejection
from .identity import (
    KeyFunc,
    TrustedProxies,
    api_key_or_ip,
    display_key,
    settled_key,
    storage_id,
    with_trusted_proxies,
)
from .limiter import Hit, RateLimiter, combine
from .rates import RateLike, as_rates
from .storage import Storage

if TYPE_CHECKING:
    from .fastapi import Limiter

__all__ = [
    "DECISIONS",
    "RateLimitMiddleware",
    "RawResponse",
    "RejectionResponse",
    "Rule",
    "maybe_await",
    "record_decision",
    "send_rejection",
]

logger = logging.getLogger("quotagate")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scope key under which the decisions taken for a request are kept until its response starts.
DECISIONS = "quotagate.decisions"


async def maybe_await(value: Any) -> Any:
    """The value, awaited if it is awaitable: user callbacks may be sync or async."""
    return await value if inspect.isawaitable(value) else value


def record_decision(scope: Scope, decision: Decision) -> None:
    scope.setdefault(DECISIONS, []).append(decision)


def storage_error_decision() -> Decision:
    """What an unrecoverable storage error turns into: 503, retry in a second (never a 500)."""
    return Decision(False, "unavailable", 1.0, 0, 0, 0.0, ())


async def send_rejection(scope: Scope, send: Send, decision: Decision) -> None:
    await RejectionResponse(decision)(scope, None, send)


class RawResponse(Response):
    """A Starlette response whose headers are given whole (content-type and -length
    included, as ``quotagate.http`` renders them): no header models, two ``send`` calls."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status_code = status
        self.raw_headers = headers
        self.body = body
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body})


class RejectionResponse(RawResponse):
    """A rejection rendered by ``quotagate.http``: it carries the rate-limit headers already,
    so it takes the request's decisions out of the scope (no wrapper adds them twice)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(*rejection(decision))

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        decisions = scope.get(DECISIONS)
        if decisions:
            decisions.clear()
        await super().__call__(scope, receive, send)


def with_rate_limit_headers(scope: Scope, send: Send) -> Send:
    """Wrap ``send`` so the response start carries the headers of the request's decisions.

    The first wrapper to see the start renders them and empties the decisions, so nested
    limiters (a middleware around a limited app) add them once.
    """

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            decisions = scope.get(DECISIONS)
            if decisions:
                decision = decisions[0] if len(decisions) == 1 else combine(decisions)
                decisions.clear()
                headers = rate_limit_headers(decision)
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers


@dataclass(frozen=True, slots=True)
class Rule:
    """Limit requests whose path matches ``pattern`` (a glob: ``/v1/*``, ``*`` crosses ``/``).

    ``rates`` None exempts the matching paths. ``cost`` is an int or a callable of the request.
    ``name`` is the counter's name: rules with one name share a counter (default: the pattern).
    """

    pattern: str
    rates: RateLike | None
    methods: frozenset[str] | None = None
    cost: int | Callable[[Request], int | Awaitable[int]] = 1
    key_func: KeyFunc | None = None
    name: str | None = None


class RateLimitMiddleware:
    """Rate limits by route rules for any ASGI app; the first rule that matches applies.

    Args:
        app: the ASGI app to protect.
        limiter: the engine (``quotagate.RateLimiter``), a storage or its URL, or a
            ``quotagate.fastapi.Limiter`` (its engine, and its key function unless
            ``key_func`` is given: one set of counters for the decorators and the rules).
        rules: ``Rule`` values or ``(pattern, rates)`` pairs, e.g. ``("/v1/*", "60/minute")``;
            ``(pattern, None)`` exempts.
        key_func: who the client is; default ``api_key_or_ip``.
        trusted_proxies: CIDRs whose ``X-Forwarded-For`` / ``Forwarded`` the built-in key
            functions believe.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | Storage | str | Limiter = "memory://",
        rules: Sequence[Rule | tuple[str, RateLike | None]],
        key_func: KeyFunc | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.app = app
        if isinstance(limiter, RateLimiter):
            self.limiter = limiter
        elif isinstance(getattr(limiter, "engine", None), RateLimiter):  # quotagate.fastapi's
            self.limiter = limiter.engine  # type: ignore[union-attr]
            key_func = key_func or limiter.key_func  # type: ignore[union-attr]
        elif isinstance(limiter, Storage | str):
            self.limiter = RateLimiter(limiter)
        else:
            raise ConfigError(
                f"limiter: expected a RateLimiter, a Storage, a storage URL or a "
                f"quotagate.fastapi.Limiter, got {type(limiter).__name__}"
            )
        key_func = key_func or api_key_or_ip
        self.trusted = TrustedProxies(trusted_proxies)
        self.key_func = with_trusted_proxies(key_func, self.trusted)
        self.rules = [rule if isinstance(rule, Rule) else Rule(*rule) for rule in rules]
        for rule in self.rules:
            if rule.rates is not None:
                as_rates(rule.rates)  # a bad rate fails at start-up, not on a request
        self._patterns = [re.compile(translate(rule.pattern)) for rule in self.rules]

    def _closing_at_shutdown(self, receive: Receive) -> Receive:
        """The app's lifespan, closing the engine (its Redis connections) at shutdown; it
        connects on the first request it decides."""

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.limiter.aclose()
            return message

        return lifespan_receive

    def match(self, path: str, method: str) -> Rule | None:
        for rule, pattern in zip(self.rules, self._patterns, strict=True):
            if pattern.match(path) and (rule.methods is None or method in rule.methods):
                return rule
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._closing_at_shutdown(receive)
            await self.app(scope, receive, send)
            return
        rule = self.match(scope["path"], scope["method"])
        if rule is None or rule.rates is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        key = (rule.key_func or self.key_func)(request)
        if not isinstance(key, str):  # async, None or not text
            key = await settled_key(key, request, self.trusted)
        cost = rule.cost if isinstance(rule.cost, int) else await maybe_await(rule.cost(request))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "quotagate: %s %s -> client %s", scope["method"], scope["path"], display_key(key)
            )
        hit = Hit(f"{{{storage_id(key)}}}:{rule.name or rule.pattern}", rule.rates, cost)
        try:
            if not self.limiter.started:
                await self.limiter.start()
            decision = await self.limiter.hit_many((hit,))
        except StorageError as exc:
            logger.error("quotagate: storage error, answering 503: %s", exc)
            decision = storage_error_decision()
        record_decision(scope, decision)
        if not decision.allowed:
            await send_rejection(scope, send, decision)
            return
        await self.app(scope, receive, with_rate_limit_headers(scope, send))

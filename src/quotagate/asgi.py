"""Pure ASGI middleware (Starlette's ``trustedhost.py`` / ``cors.py`` are the model).

``RateLimitMiddleware`` limits any ASGI app by route rules, no decorators needed; the fastapi
module's ``Limiter.init_app`` installs a middleware of its own. Both decide and add the headers
with the plumbing of ``quotagate._asgi`` (one decision per request; ``send`` wrapped at
``http.response.start``, so success, error, 429 and streaming responses all carry them);
non-HTTP scopes pass straight through. Never ``BaseHTTPMiddleware``.

This module knows nothing of the fastapi one (a layer above it): a ``fastapi.Limiter`` hands
its engine and key function over with ``**limiter.middleware_options()``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import translate

from starlette.requests import Request

from ._asgi import (
    Limit,
    decide,
    maybe_await,
    record_decision,
    send_rejection,
    with_rate_limit_headers,
)
from ._types import ASGIApp, Message, Receive, Scope, Send
from .errors import ConfigError
from .identity import KeyFunc, TrustedProxies, api_key_or_ip, with_trusted_proxies
from .limiter import RateLimiter
from .rates import RateLike, as_rates
from .storage import Storage

__all__ = ["RateLimitMiddleware", "Rule"]


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
        limiter: the engine (``quotagate.RateLimiter``), a storage or its URL. To count in
            the counters of a ``quotagate.fastapi.Limiter``, with its key function, pass
            ``**limiter.middleware_options()`` instead.
        rules: ``Rule`` values or ``(pattern, rates)`` pairs, e.g. ``("/v1/*", "60/minute")``;
            ``(pattern, None)`` exempts.
        key_func: who the client is; default ``api_key_or_ip``.
        trusted_proxies: CIDRs (or a ``TrustedProxies``) whose ``X-Forwarded-For`` /
            ``Forwarded`` the built-in key functions believe.

    Raises:
        ConfigError: ``limiter`` is none of those, or a rule's rates do not parse.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | Storage | str = "memory://",
        rules: Sequence[Rule | tuple[str, RateLike | None]],
        key_func: KeyFunc | None = None,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
    ) -> None:
        self.app = app
        if isinstance(limiter, RateLimiter):
            self.limiter = limiter
        elif isinstance(limiter, Storage | str):
            self.limiter = RateLimiter(limiter)
        else:
            raise ConfigError(
                f"limiter: expected a RateLimiter, a Storage or a storage URL, got "
                f"{_type_name(limiter)} (for a quotagate.fastapi.Limiter, pass "
                f"**limiter.middleware_options(): its engine and its key function)"
            )
        if isinstance(trusted_proxies, TrustedProxies):
            self.trusted = trusted_proxies
        else:
            self.trusted = TrustedProxies(trusted_proxies)
        self.key_func = with_trusted_proxies(key_func or api_key_or_ip, self.trusted)
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
        cost = rule.cost if isinstance(rule.cost, int) else await maybe_await(rule.cost(request))
        key_func = rule.key_func or self.key_func
        limit: Limit = (key_func, rule.name or rule.pattern, rule.rates, cost, "gcra")
        decision = await decide(self.limiter, request, (limit,), self.trusted)
        record_decision(scope, decision)
        if not decision.allowed:
            await send_rejection(scope, send, decision)
            return
        await self.app(scope, receive, with_rate_limit_headers(scope, send))


def _type_name(value: object) -> str:
    """``int``, ``quotagate.fastapi.Limiter``: a value's type as a user would import it."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )

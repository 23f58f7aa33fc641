"""FastAPI / Starlette: the seed tutorial's slowapi code with a change of imports, done right.

    limiter = Limiter(key_func=api_key_or_ip, storage_uri="redis://localhost:6379/0")
    app = FastAPI()
    limiter.init_app(app)

    @app.post("/v1/completions")
    @limiter.limit("60/minute")
    async def completions(body: dict): ...

Unlike slowapi: async storage (never blocks the event loop), every limit of a route in one
storage round trip, headers on every response without a ``response`` parameter, and a Redis
outage falls back to limiting in memory instead of failing requests.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, get_args

from fastapi import HTTPException  # Starlette's, with a detail of any JSON
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ._asgi import (
    Limit,
    RejectionResponse,
    decide,
    maybe_await,
    record_decision,
    with_rate_limit_headers,
)
from ._routes import app_handler, find_endpoint, share_handler, warn_unlimited_routes
from ._types import Algorithm, ASGIApp, Receive, Scope, Send
from .decision import Decision
from .errors import ConfigError, QuotagateError
from .http import rejection_parts, retry_after_seconds
from .identity import KeyFunc, TrustedProxies, api_key_or_ip, with_trusted_proxies
from .limiter import RateLimiter
from .rates import RateLike, as_rates
from .storage import Storage

__all__ = [
    "CostSource",
    "ExemptWhen",
    "LimitSpec",
    "Limiter",
    "MiddlewareOptions",
    "RateLimitExceeded",
    "RateSource",
    "is_request",
    "limit_of",
    "limited_endpoint",
    "of_request",
    "resolved_signature",
    "whole_cost",
]

logger = logging.getLogger("quotagate")

F = TypeVar("F", bound=Callable[..., Any])
#: Rates, or a callable giving them: of the request, of the client key (a parameter named
#: ``key``, slowapi's convention) or of nothing; sync or async.
RateSource = RateLike | Callable[..., RateLike | Awaitable[RateLike]]
#: Units per request: a number (a fraction is rounded up) or a callable of the request or of
#: nothing giving one.
CostSource = float | Callable[..., float | Awaitable[float]]
#: True skips the limit: a callable of the request or of nothing, sync or async.
ExemptWhen = Callable[..., bool | Awaitable[bool]]
#: Runs before a limited endpoint: a response to answer with instead (a rejection), or None.
Before = Callable[[Request], Awaitable[Any]]
#: Runs on what the endpoint returned, with the endpoint's arguments: what to answer.
After = Callable[[Request, Any, Mapping[str, Any]], Any]

_SPECS = "__quotagate_limits__"
_EXEMPT = "__quotagate_exempt__"
_REQUEST_PARAM = "quotagate_request__"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One ``@limiter.limit(...)``, its callables already in one convention: of the request."""

    rates: RateLike | Callable[[Request], RateLike | Awaitable[RateLike]]
    cost: int | Callable[[Request], float | Awaitable[float]] = 1
    key_func: KeyFunc | None = None
    scope: str | None = None
    exempt_when: Callable[[Request], bool | Awaitable[bool]] | None = None
    algorithm: Algorithm = "gcra"

    @classmethod
    def of(
        cls,
        rates: RateSource,
        limiter_key: KeyFunc,
        *,
        cost: CostSource = 1,
        key_func: KeyFunc | None = None,
        scope: str | None = None,
        exempt_when: ExemptWhen | None = None,
        algorithm: Algorithm = "gcra",
    ) -> LimitSpec:
        """A spec whose every mistake is found now, at decoration time, not per request: bad
        rate text, a callable that takes the wrong arguments, a bad cost or algorithm."""
        if algorithm not in get_args(Algorithm):
            raise ConfigError(
                f"algorithm must be one of {list(get_args(Algorithm))}, got {algorithm!r}"
            )
        key = None if key_func is None else of_request(key_func, "key_func")
        if callable(rates):
            rates = of_request(rates, "limit provider", key_func=key or limiter_key)
        else:
            as_rates(rates)
        return cls(
            rates,
            of_request(cost, "cost") if callable(cost) else whole_cost(cost),
            key,
            scope,
            None if exempt_when is None else of_request(exempt_when, "exempt_when"),
            algorithm,
        )


def of_request(
    func: Callable[..., Any], what: str, *, key_func: KeyFunc | None = None
) -> Callable[[Request], Any]:
    """``func`` as a callable of the request, whichever convention it follows, decided once
    (slowapi takes key functions and ``exempt_when`` of nothing, and limit providers of the
    client key): no parameter, called with none; with ``key_func``, one parameter named
    ``key``, called with the client key (``key_func``'s answer); one parameter, called with the
    request.

    Raises:
        ConfigError: ``func`` needs more than one argument (it would fail on every request).
    """
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: take it at its word
        return func
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [
        p
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) > 1 or any(p.kind is p.KEYWORD_ONLY for p in required):
        names = ", ".join(p.name for p in required)
        raise ConfigError(
            f"{what} {getattr(func, '__qualname__', func)!r} takes ({names}): give a callable "
            "of the request, or of nothing"
        )
    if not positional and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return lambda request: func()
    if key_func is not None and positional[0].name == "key":

        async def of_key(request: Request) -> Any:
            key = key_func(request)
            return await maybe_await(func(await maybe_await(key)))

        return of_key
    return func


def whole_cost(cost: object) -> int:
    """A cost in whole units: a fraction is rounded up (never charge less than asked).

    Raises:
        ConfigError: not a non-negative number.
    """
    if isinstance(cost, int) and not isinstance(cost, bool) and cost >= 0:
        return cost
    if isinstance(cost, float) and math.isfinite(cost) and cost >= 0:
        return math.ceil(cost)
    raise ConfigError(f"cost must be a non-negative number, got {cost!r}")


async def limit_of(
    spec: LimitSpec, request: Request, scope: str, key_func: KeyFunc
) -> Limit | None:
    """The limit ``spec`` puts on this request, counted under ``scope`` (``key_func`` when the
    spec has none of its own); None when ``exempt_when`` says so."""
    if spec.exempt_when is not None and await maybe_await(spec.exempt_when(request)):
        return None
    rates = spec.rates
    if callable(rates):
        rates = await maybe_await(rates(request))
    cost = spec.cost
    if not isinstance(cost, int):
        cost = whole_cost(await maybe_await(cost(request)))
    return (
        key_func if spec.key_func is None else spec.key_func,
        scope,
        rates,
        cost,
        spec.algorithm,
    )


class RateLimitExceeded(QuotagateError):
    """A rejected request. ``init_app``'s handler answers it with the seed's 429 (or the 503
    of a storage outage). Register your own handler for it to shape the answer: every
    rejection, decorator or dependency, then goes through yours (the rate-limit headers are
    still added; ``retry_after`` is the whole seconds of the seed's body and Retry-After;
    ``decision.reason`` tells a limit, ``limited`` or ``too_large``, from a storage outage
    under the ``deny`` fallback, ``unavailable``).
    """

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"rate limit exceeded: retry after {decision.retry_after:.1f} s")
        self.decision = decision
        self.retry_after = retry_after_seconds(decision.retry_after)


class MiddlewareOptions(TypedDict):
    """What ``quotagate.asgi.RateLimitMiddleware`` needs to count as a ``Limiter`` does."""

    limiter: RateLimiter
    key_func: KeyFunc
    trusted_proxies: TrustedProxies


class Limiter:
    """Rate limits for FastAPI and Starlette apps.

    Args:
        key_func: who the client is (sync or async, takes the request); default
            ``api_key_or_ip``. The result is hashed before storage unless it is an address.
        storage_uri: ``memory://`` (default) or ``redis://host:6379/0`` (with an in-memory
            fallback while Redis is down; see ``storage_from_url``).
        storage: a Storage instance instead of a URI.
        default_limits: limits for every route without its own (each route counts apart).
        trusted_proxies: CIDRs whose ``X-Forwarded-For`` / ``Forwarded`` the built-in key
            functions believe; default none.
        headers_enabled: send the rate-limit headers on responses of limited routes.
        enabled: False turns every check off (tests, maintenance).
        overlimit_cache: answer a just-rejected client's repeats in process, without a storage
            call. Off by default here, so that a Redis ``FLUSHDB`` resets counters at once (the
            seed tutorial's check); turn it on to shield Redis from clients that hammer on.
    """

    def __init__(
        self,
        key_func: KeyFunc = api_key_or_ip,
        *,
        storage_uri: str | None = None,
        storage: Storage | None = None,
        default_limits: Sequence[RateSource] = (),
        trusted_proxies: Iterable[str] = (),
        headers_enabled: bool = True,
        enabled: bool = True,
        overlimit_cache: bool = False,
    ) -> None:
        if storage is not None and storage_uri is not None:
            raise ConfigError("give storage_uri or storage, not both")
        self.engine = RateLimiter(
            storage if storage is not None else storage_uri or "memory://",
            overlimit_cache=overlimit_cache,
        )
        self.trusted_proxies = TrustedProxies(trusted_proxies)
        self.key_func = of_request(with_trusted_proxies(key_func, self.trusted_proxies), "key_func")
        self.default_limits = [LimitSpec.of(rates, self.key_func) for rates in default_limits]
        self.headers_enabled = headers_enabled
        self.enabled = enabled
        self._installed = False  # init_app called (on some app)
        self._wrapped: set[int] = set()  # ids of the endpoints given a limit, unwrapped
        # Until init_app installs the middleware, nothing adds the headers of an admitted
        # request and nothing applies default_limits (the seed's ``app.state.limiter =
        # limiter`` alone): say so, once. One flag, read on every decision, rather than
        # ``_installed`` and a "said it" flag.
        self._warn_uninstalled = headers_enabled or bool(self.default_limits)

    @property
    def storage(self) -> Storage:
        return self.engine.storage

    async def start(self) -> None:
        await self.engine.start()

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def reset(self) -> int:
        """Forget every counter: every client starts afresh (slowapi's ``reset``, awaited).
        With Redis, every key under the storage's prefix. Returns how many states went."""
        return await self.engine.reset()

    def middleware_options(self) -> MiddlewareOptions:
        """This limiter's engine, key function and trusted proxies, as keyword arguments of
        ``quotagate.asgi.RateLimitMiddleware``: its rules then count in this limiter's
        storage, with the same idea of who the client is as the decorators.

            app.add_middleware(RateLimitMiddleware, **limiter.middleware_options(),
                               rules=[("/v1/*", "60/minute")])
        """
        return {
            "limiter": self.engine,
            "key_func": self.key_func,
            "trusted_proxies": self.trusted_proxies,
        }

    def init_app(self, app: Starlette) -> None:
        """Install the limiter on an app: headers on every response, the 429 handler for the
        dependency form, default limits, and start/stop with the app's lifespan."""
        app.state.limiter = self
        self._installed = True
        self._warn_uninstalled = False
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
        app.add_middleware(_LimiterMiddleware, limiter=self, app_routes=app)
        original = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(lifespan_app: Any) -> AsyncIterator[Any]:
            async with original(lifespan_app) as state:
                await self.start()
                try:
                    yield state
                finally:
                    await self.aclose()

        app.router.lifespan_context = lifespan

    def limit(
        self,
        rates: RateSource,
        *,
        cost: CostSource = 1,
        key_func: KeyFunc | None = None,
        scope: str | None = None,
        exempt_when: ExemptWhen | None = None,
        algorithm: Algorithm = "gcra",
    ) -> Callable[[F], F]:
        """Decorate an endpoint (below ``@app.post(...)``) with a limit.

        Args:
            rates: ``"60/minute; 1000/day"``, or a callable (sync or async) returning rates:
                tiered limits by the caller's tier. It is called with the request, or with the
                client key when its parameter is named ``key`` (slowapi's ``limit_for(key)``),
                or with nothing when it takes nothing.
            cost: units per request (a fraction is rounded up), or a callable of the request
                (e.g. its token count) or of nothing.
            key_func: who the client is, for this route only (of the request, or of nothing).
            scope: a counter name shared by every route that gives it (default: per route).
            exempt_when: a callable of the request, or of nothing; True skips the limit.
            algorithm: ``gcra`` (default) or ``fixed_window``.

        Several ``@limiter.limit`` on one endpoint are checked together, in one storage call.

        Raises:
            ConfigError: a bad rate, cost or algorithm, or a callable taking more than one
                argument: at decoration time, not as a 500 on every request.
        """
        spec = self._spec(rates, cost, key_func, scope, exempt_when, algorithm)

        def decorator(func: F) -> F:
            specs: list[LimitSpec] | None = getattr(func, _SPECS, None)
            if specs is not None:
                specs.insert(0, spec)  # decorators apply bottom-up; keep source order
                return func
            return self._wrap(func, [spec])

        return decorator

    def _spec(
        self,
        rates: RateSource,
        cost: CostSource,
        key_func: KeyFunc | None,
        scope: str | None,
        exempt_when: ExemptWhen | None,
        algorithm: Algorithm,
    ) -> LimitSpec:
        return LimitSpec.of(
            rates,
            self.key_func,
            cost=cost,
            key_func=key_func,
            scope=scope,
            exempt_when=exempt_when,
            algorithm=algorithm,
        )

    def exempt(self, func: F) -> F:
        """Exclude an endpoint from ``default_limits``."""
        setattr(func, _EXEMPT, True)
        return func

    def depends(
        self,
        rates: RateSource,
        *,
        cost: CostSource = 1,
        key_func: KeyFunc | None = None,
        scope: str | None = None,
        exempt_when: ExemptWhen | None = None,
        algorithm: Algorithm = "gcra",
    ) -> Callable[[Request], Awaitable[None]]:
        """The same limit as a FastAPI dependency: ``Depends(limiter.depends("60/minute"))``.

        A rejection raises ``RateLimitExceeded``, which ``init_app`` answers with the 429.
        """
        spec = self._spec(rates, cost, key_func, scope, exempt_when, algorithm)

        async def rate_limit_dependency(request: Request) -> None:
            route = request.scope.get("route")
            default_scope = _scope_id(getattr(route, "path", request.url.path))
            decision = await self.check(request, [spec], default_scope)
            if decision is not None and not decision.allowed:
                if not self._installed and app_handler(request.scope, RateLimitExceeded) is None:
                    # No init_app: nothing would answer our exception but a 500 (with it, the
                    # app it was called on answers, even from a mounted sub-app). Starlette's
                    # HTTPException handler is always there: the seed's body under "detail".
                    status, headers, body = rejection_parts(decision)
                    raise HTTPException(
                        status, detail=body, headers={k.decode(): v.decode() for k, v in headers}
                    )
                raise RateLimitExceeded(decision)

        return rate_limit_dependency

    async def check(
        self, request: Request, specs: Sequence[LimitSpec], default_scope: str
    ) -> Decision | None:
        """Decide every limit in ``specs`` for this request in one storage call.

        Records the decision for the response headers; None when no limit applied.
        """
        if not self.enabled:
            return None
        limits: list[Limit] = []
        for spec in specs:
            limit = await limit_of(spec, request, spec.scope or default_scope, self.key_func)
            if limit is not None:
                limits.append(limit)
        if not limits:
            return None
        decision = await decide(self.engine, request, limits, self.trusted_proxies)
        if self.headers_enabled or not decision.allowed:
            record_decision(request.scope, decision)
        if self._warn_uninstalled:
            self._warn_uninstalled = False
            missing = ["admitted responses carry no rate-limit headers (429s do)"]
            if self.default_limits:
                missing.insert(0, "default_limits apply to NO route without @limiter.limit")
            logger.warning(
                "quotagate: Limiter.init_app(app) was not called, so %s: call it once after "
                "creating the app",
                " and ".join(missing),
            )
        return decision

    def _wrap(self, func: F, specs: list[LimitSpec]) -> F:
        self._wrapped.add(id(func))  # the wrapper keeps func alive: its id stays its own
        default_scope = _scope_id(f"{func.__module__}.{func.__qualname__}")

        async def before(request: Request) -> Response | None:
            decision = await self.check(request, specs, default_scope)
            if decision is not None and not decision.allowed:
                handler = app_handler(request.scope, RateLimitExceeded)
                if handler is not None and handler is not _rate_limit_exceeded_handler:
                    raise RateLimitExceeded(decision)  # the app's own answer
                return RejectionResponse(decision)
            return None

        endpoint = limited_endpoint(func, before)
        setattr(endpoint, _SPECS, specs)
        return endpoint


def limited_endpoint(func: F, before: Before, after: After | None = None) -> F:
    """``func`` with ``before`` run ahead of it (what it returns, if not None, is the answer
    instead) and ``after`` on its result, both given the request.

    The endpoint keeps its signature for FastAPI; when no parameter is annotated ``Request``,
    a hidden one is added that FastAPI fills and the endpoint never sees (a plain Starlette
    endpoint gets the request as its argument). Sync endpoints run in the thread pool.
    """
    signature = resolved_signature(func)
    request_param = next(
        (p.name for p in signature.parameters.values() if is_request(p.annotation)), None
    )
    if request_param is None:
        extra = inspect.Parameter(
            _REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request
        )
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        signature = signature.replace(parameters=[*params[:at], extra, *params[at:]])
    is_async = inspect.iscoroutinefunction(func)

    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        if request_param is None:
            request = kwargs.pop(_REQUEST_PARAM, None)
        else:
            request = kwargs.get(request_param)
        if request is None:  # a Starlette endpoint: called as endpoint(request)
            request = next((a for a in args if isinstance(a, Request)), None)
            if request is None:
                raise TypeError(f"{func.__qualname__}: a limited endpoint needs its request")
        answer = await before(request)
        if answer is not None:
            return answer
        if is_async:
            result = await func(*args, **kwargs)
        else:
            result = await run_in_threadpool(func, *args, **kwargs)
        return result if after is None else after(request, result, kwargs)

    endpoint.__signature__ = signature  # type: ignore[attr-defined]
    return endpoint  # type: ignore[return-value]


def _scope_id(name: str) -> str:
    """A short, stable counter name for a route (every replica derives the same one)."""
    return "r" + hashlib.blake2s(name.encode(), digest_size=5).hexdigest()


def resolved_signature(func: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations evaluated in the endpoint's own module (FastAPI
    would otherwise resolve them in ours, since the wrapper's globals are ours)."""
    try:
        return inspect.signature(func, eval_str=True)
    except (NameError, TypeError):
        return inspect.signature(func)


def is_request(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Request)


async def _rate_limit_exceeded_handler(request: Request, exc: RateLimitExceeded) -> Response:
    return RejectionResponse(exc.decision)


class _LimiterMiddleware:
    """Headers on every response of a limited route, and ``default_limits`` for routes that
    have no limit of their own (found by matching the app's routes, mounts included)."""

    def __init__(self, app: ASGIApp, limiter: Limiter, app_routes: Starlette) -> None:
        self.app = app
        self.limiter = limiter
        self.routes_of = app_routes
        self._mounts_ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._mounts_ready:  # the first request: every route and mount is in place
            self._mounts_ready = True
            share_handler(self.routes_of, RateLimitExceeded, _rate_limit_exceeded_handler)
            warn_unlimited_routes(self.routes_of.routes, self.limiter._wrapped)
        limiter = self.limiter
        if limiter.default_limits and limiter.enabled:
            endpoint, path = find_endpoint(self.routes_of.routes, scope)
            if not _limited_or_exempt(endpoint):
                request = Request(scope, receive)
                decision = await limiter.check(request, limiter.default_limits, "default:" + path)
                if decision is not None and not decision.allowed:
                    handler = app_handler(scope, RateLimitExceeded) or _rate_limit_exceeded_handler
                    response = await maybe_await(handler(request, RateLimitExceeded(decision)))
                    await response(scope, receive, with_rate_limit_headers(scope, send))
                    return
        if limiter.headers_enabled:
            send = with_rate_limit_headers(scope, send)
        await self.app(scope, receive, send)


def _limited_or_exempt(endpoint: Any) -> bool:
    return endpoint is not None and (hasattr(endpoint, _SPECS) or hasattr(endpoint, _EXEMPT))

"""slowapi's ``Limiter`` on quotagate's engine: its constructor, defaults, decorators, callable
conventions and headers, with async storage and every limit of a request in one round trip.

What it keeps of slowapi: ``key_func`` first and positional; counters per URL
(``key_style="url"``) or per function (``"endpoint"``); ``headers_enabled`` off by default,
and when on, ``X-RateLimit-Reset`` as an epoch and ``Retry-After`` on successes too; the
``RATELIMIT_*`` settings from the environment or ``config_filename``; a sync ``reset()``.

What it does not keep: a mistake in the set-up is an error at construction, at decoration or
when the app starts, never a 500 on every request; a rejected request costs nothing; a 429
always carries ``Retry-After``; a storage outage is a 503 (or limits in memory with
``in_memory_fallback_enabled``, or no limits with ``swallow_errors``), never a 500.

``strategy`` picks one of the engine's algorithms (``STRATEGIES``): ``fixed-window`` (the
default) and ``fixed-window-elastic-expiry`` count in fixed windows aligned to the calendar
(a hit does not stretch the window); ``moving-window`` and ``sliding-window-counter`` are
GCRA, which spaces requests as they do without a log of hits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

from starlette.config import Config
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._asgi import RejectionResponse, decide
from .._routes import all_routes
from .._types import Algorithm, Scope
from ..decision import Decision
from ..errors import ConfigError
from ..fastapi import (
    CostSource,
    ExemptWhen,
    LimitSpec,
    RateSource,
    is_request,
    limit_of,
    limited_endpoint,
    of_request,
    resolved_signature,
)
from ..http import retry_after_seconds
from ..identity import KeyFunc, TrustedProxies, storage_id
from ..keys import state_key
from ..limiter import RateLimiter
from ..rates import as_rates, parse_rate
from ..storage import FallbackStorage, MemoryStorage, storage_from_url
from .errors import RateLimitExceeded
from .wrappers import ErrorMessage, Limit, LimitGroup, limits_text

__all__ = ["MIDDLEWARE", "STRATEGIES", "C", "Limiter", "Record", "_rate_limit_exceeded_handler"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: slowapi's strategies (``limits``' names) and the engine's algorithm for each.
STRATEGIES: dict[str, Algorithm] = {
    "fixed-window": "fixed_window",
    "fixed-window-elastic-expiry": "fixed_window",
    "moving-window": "gcra",
    "sliding-window-counter": "gcra",
}

_MICROS = 1_000_000

#: Set on a decorated endpoint: its limit groups (the middleware leaves it to the decorator).
_GROUPS = "__quotagate_slowapi_limits__"
_EXEMPT = "__quotagate_slowapi_exempt__"
#: Scope key the middleware sets: it renders the headers, the decorator need not.
MIDDLEWARE = "quotagate.slowapi.middleware"


class C:
    """The ``RATELIMIT_*`` settings slowapi reads from the environment or ``config_filename``."""

    ENABLED = "RATELIMIT_ENABLED"
    HEADERS_ENABLED = "RATELIMIT_HEADERS_ENABLED"
    STORAGE_URL = "RATELIMIT_STORAGE_URL"
    STRATEGY = "RATELIMIT_STRATEGY"
    DEFAULT_LIMITS = "RATELIMIT_DEFAULT"
    APPLICATION_LIMITS = "RATELIMIT_APPLICATION"
    HEADER_LIMIT = "RATELIMIT_HEADER_LIMIT"
    HEADER_REMAINING = "RATELIMIT_HEADER_REMAINING"
    HEADER_RESET = "RATELIMIT_HEADER_RESET"
    SWALLOW_ERRORS = "RATELIMIT_SWALLOW_ERRORS"
    IN_MEMORY_FALLBACK = "RATELIMIT_IN_MEMORY_FALLBACK"
    IN_MEMORY_FALLBACK_ENABLED = "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"
    HEADER_RETRY_AFTER = "RATELIMIT_HEADER_RETRY_AFTER"
    HEADER_RETRY_AFTER_VALUE = "RATELIMIT_HEADER_RETRY_AFTER_VALUE"
    KEY_PREFIX = "RATELIMIT_KEY_PREFIX"


def _wall_clock() -> float:
    """``time.time`` looked up at every call, so a test that patches it (hiro, freezegun)
    moves the memory storage's clock too."""
    return time.time()


@dataclass(frozen=True, slots=True)
class Record:
    """A request's decision, kept as ``request.state.view_rate_limit`` (slowapi's name: a
    handler that calls ``limiter._inject_headers(response, request.state.view_rate_limit)``
    keeps working) until its headers are rendered."""

    limiter: Limiter
    decision: Decision
    now: float
    failed: Limit | None

    def exception(self) -> RateLimitExceeded:
        assert self.failed is not None
        headers = MutableHeaders()
        self.limiter._set_headers(headers, self)
        return RateLimitExceeded(self.failed, self.decision, headers)


def _rate_limit_exceeded_handler(request: Request, exc: RateLimitExceeded) -> Response:
    """slowapi's handler, sync as slowapi's is (a handler of yours may call it): 429
    ``{"error": "Rate limit exceeded: <detail>"}`` with the rate-limit headers."""
    response = JSONResponse({"error": f"Rate limit exceeded: {exc.detail}"}, status_code=429)
    record = getattr(request.state, "view_rate_limit", None)
    if isinstance(record, Record):
        record.limiter._inject_headers(response, record)
    return response


class Limiter:
    """slowapi's ``Limiter``, with its arguments and defaults (see its documentation), on
    quotagate's engine.

    Raises:
        ConfigError: a bad rate, strategy, ``key_style``, ``retry_after``, storage URL or
            ``RATELIMIT_*`` setting, named.
    """

    def __init__(
        self,
        key_func: Callable[..., Any],
        default_limits: Sequence[RateSource] = (),
        application_limits: Sequence[RateSource] = (),
        headers_enabled: bool = False,
        strategy: str | None = None,
        storage_uri: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        auto_check: bool = True,
        swallow_errors: bool = False,
        in_memory_fallback: Sequence[RateSource] = (),
        in_memory_fallback_enabled: bool = False,
        retry_after: str | None = None,
        key_prefix: str = "",
        enabled: bool = True,
        config_filename: str | None = None,
        key_style: Literal["endpoint", "url"] = "url",
    ) -> None:
        self.logger = logging.getLogger("quotagate.slowapi")
        use_dotenv = config_filename is None and os.path.isfile(".env")
        config = _Settings(Config(".env" if use_dotenv else config_filename))
        self.enabled = config.flag(C.ENABLED, enabled)
        self._headers_enabled = headers_enabled or config.flag(C.HEADERS_ENABLED, False)
        self._swallow_errors = config.flag(C.SWALLOW_ERRORS, swallow_errors)
        self._auto_check = auto_check
        strategy = strategy or config.text(C.STRATEGY) or "fixed-window"
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self._algorithm = STRATEGIES[strategy]
        if key_style not in ("url", "endpoint"):
            raise ConfigError(f"key_style must be 'url' or 'endpoint', got {key_style!r}")
        self._key_style = key_style
        self._retry_after = retry_after or config.text(C.HEADER_RETRY_AFTER_VALUE)
        if self._retry_after not in (None, "http-date", "delta-seconds"):
            raise ConfigError(f"retry_after must be 'http-date' or None, got {retry_after!r}")
        self._header_names = (
            config.text(C.HEADER_LIMIT) or "X-RateLimit-Limit",
            config.text(C.HEADER_REMAINING) or "X-RateLimit-Remaining",
            config.text(C.HEADER_RESET) or "X-RateLimit-Reset",
            config.text(C.HEADER_RETRY_AFTER) or "Retry-After",
        )
        self._key_prefix = key_prefix or config.text(C.KEY_PREFIX) or ""
        self._key_func = of_request(key_func, "key_func")
        self._trusted = TrustedProxies()

        fallback_limits = list(in_memory_fallback) or config.limits(C.IN_MEMORY_FALLBACK)
        in_memory = in_memory_fallback_enabled or bool(fallback_limits)
        in_memory = in_memory or config.flag(C.IN_MEMORY_FALLBACK_ENABLED, False)
        self._storage_url = storage_uri or config.text(C.STORAGE_URL) or "memory://"
        if storage_options:  # redis-py reads its options from the URL's query
            separator = "&" if "?" in self._storage_url else "?"
            self._storage_url += separator + urlencode(storage_options)
        storage = storage_from_url(
            self._storage_url,
            fallback="memory" if in_memory else "allow" if self._swallow_errors else "deny",
            prefix=self._key_prefix or None,
        )
        for memory in (storage, getattr(storage, "memory", None)):
            if isinstance(memory, MemoryStorage):
                memory.clock = _wall_clock
        # No over-limit cache: a reset (or a FLUSHDB) frees everyone at once, as in slowapi.
        self.engine = RateLimiter(storage, overlimit_cache=False)

        defaults = list(dict.fromkeys(default_limits)) or config.limits(C.DEFAULT_LIMITS)
        self._default_limits = [
            LimitGroup(self._spec(r), override_defaults=False) for r in defaults
        ]
        application = list(application_limits) or config.limits(C.APPLICATION_LIMITS)
        self._application_limits = [LimitGroup(self._spec(r), "global") for r in application]
        self._in_memory_fallback = [LimitGroup(self._spec(r)) for r in fallback_limits]
        self._wrapped: set[int] = set()  # ids of the decorated functions, unwrapped
        # Defaults without a middleware apply to nothing: said once, at the first decision.
        self._warn_no_middleware = bool(self._default_limits or self._application_limits)

    async def start(self) -> None:
        await self.engine.start()

    async def aclose(self) -> None:
        await self.engine.aclose()

    def limit(
        self,
        limit_value: RateSource,
        key_func: KeyFunc | None = None,
        per_method: bool = False,
        methods: Sequence[str] | None = None,
        error_message: ErrorMessage | None = None,
        exempt_when: ExemptWhen | None = None,
        cost: CostSource = 1,
        override_defaults: bool = True,
    ) -> Callable[[F], F]:
        """slowapi's decorator (below ``@app.get(...)``); several on one endpoint are checked
        together, all or nothing, in one storage call.

        Raises:
            ConfigError: at decoration: a bad rate or cost, a callable taking more than one
                argument, or an endpoint without a ``request`` (or ``websocket``) parameter.
        """
        spec = self._spec(limit_value, key_func, exempt_when, cost)
        chosen = None if methods is None else frozenset(m.upper() for m in methods)
        group = LimitGroup(spec, None, per_method, chosen, error_message, override_defaults)
        return self._decorator(group)

    def shared_limit(
        self,
        limit_value: RateSource,
        scope: str,
        key_func: KeyFunc | None = None,
        error_message: ErrorMessage | None = None,
        exempt_when: ExemptWhen | None = None,
        cost: CostSource = 1,
        override_defaults: bool = True,
    ) -> Callable[[F], F]:
        """A limit counted once for every route decorated with it (one counter: ``scope``)."""
        if not isinstance(scope, str):
            # slowapi accepts a callable, then fails on every request (it is never called).
            raise ConfigError(f"shared_limit: scope must be a string, got {scope!r}")
        spec = self._spec(limit_value, key_func, exempt_when, cost)
        return self._decorator(
            LimitGroup(
                spec, scope, error_message=error_message, override_defaults=override_defaults
            )
        )

    def exempt(self, obj: F) -> F:
        """Exclude an endpoint from the default and application limits."""
        setattr(obj, _EXEMPT, True)
        return obj

    def reset(self) -> None:
        """Forget every counter, synchronously (slowapi's ``reset``): memory at once; Redis
        on a connection of its own in a worker thread, so it works from sync code and from
        inside the event loop alike (blocking it while Redis answers)."""
        dropped = self._run(lambda engine: engine.reset())
        fallback = self.engine.storage
        if isinstance(fallback, FallbackStorage):  # the counters kept while Redis was down
            dropped += _completed(fallback.memory.reset())
        self.logger.info("quotagate: storage reset, %d counters dropped", dropped)

    @property
    def _storage(self) -> _StorageView:
        """Counters read by slowapi's key text (its documented key shapes)."""
        return _StorageView(self)

    def _inject_headers(self, response: Response, current_limit: Record | None) -> Response:
        """slowapi's: the headers of ``request.state.view_rate_limit`` on ``response``."""
        if current_limit is not None:
            self._set_headers(response.headers, current_limit)
        return response

    def _spec(
        self,
        rates: RateSource,
        key_func: KeyFunc | None = None,
        exempt_when: ExemptWhen | None = None,
        cost: CostSource = 1,
    ) -> LimitSpec:
        return LimitSpec.of(
            rates,
            self._key_func,
            cost=cost,
            key_func=key_func,
            exempt_when=exempt_when,
            algorithm=self._algorithm,
        )

    def _decorator(self, group: LimitGroup) -> Callable[[F], F]:
        def decorator(func: F) -> F:
            groups: list[LimitGroup] | None = getattr(func, _GROUPS, None)
            if groups is not None:
                groups.insert(0, group)  # decorators apply bottom-up; keep source order
                return func
            parameters = resolved_signature(func).parameters
            if "request" not in parameters and "websocket" not in parameters:
                raise ConfigError(f'No "request" or "websocket" argument on function "{func}"')
            return self._wrap(func, [group])

        return decorator

    def _wrap(self, func: F, groups: list[LimitGroup]) -> F:
        self._wrapped.add(id(func))  # the wrapper keeps func alive: its id stays its own
        name = f"{func.__module__}.{func.__name__}"

        async def before(request: Request) -> Response | None:
            if not (self.enabled and self._auto_check):
                return None
            applied = [*groups, *self._application_limits]
            if not any(group.override_defaults for group in groups):
                applied += self._default_limits
            key = request.scope["path"] if self._key_style == "url" else name
            record = await self._check(request, applied, key)
            return None if record is None else self._reject(record)

        def after(request: Request, result: Any, arguments: Mapping[str, Any]) -> Any:
            record = getattr(request.state, "view_rate_limit", None)
            if isinstance(record, Record) and MIDDLEWARE not in request.scope:
                # No middleware to add the headers: on the response, or on FastAPI's
                # ``response: Response`` parameter when the endpoint returns data.
                target = result if isinstance(result, Response) else None
                target = target or next(
                    (v for v in arguments.values() if isinstance(v, Response)), None
                )
                if target is not None:
                    self._set_headers(target.headers, record)
            return result

        endpoint = limited_endpoint(func, before, after)
        setattr(endpoint, _GROUPS, groups)
        return endpoint

    async def _check(
        self, request: Request, groups: Sequence[LimitGroup], endpoint_key: str
    ) -> Record | None:
        """Decide every group that applies to the request in one storage call; the record is
        kept on the request for its headers. None when none applied."""
        if self._in_memory_fallback and self.engine.storage.mode == "fallback":
            groups = self._in_memory_fallback  # slowapi's limits for while Redis is down
        method = request.method
        limits = []
        owners = []
        for group in groups:
            scope = group.scope_for(endpoint_key, method)
            if scope is not None:
                limit = await limit_of(group.spec, request, scope, self._key_func)
                if limit is not None:
                    limits.append(limit)
                    owners.append(group)
        if self._warn_no_middleware and MIDDLEWARE not in request.scope:
            self._warn_no_middleware = False
            self.logger.warning(
                "quotagate: default_limits / application_limits are set but no "
                "SlowAPIMiddleware is installed, so routes without @limiter.limit are NOT "
                "limited: app.add_middleware(SlowAPIMiddleware)"
            )
        if not limits:
            return None
        decision = await decide(self.engine, request, limits, self._trusted)
        failed: Limit | None = None
        if decision.reason in ("limited", "too_large"):  # not a storage outage
            failed = _failed_limit(decision, [limit[2] for limit in limits], owners)
            if failed is not None:
                self.logger.info(
                    "ratelimit %s exceeded at endpoint: %s", limits_text(failed.limit), endpoint_key
                )
        record = Record(self, decision, self._now(), failed)
        request.state.view_rate_limit = record
        return record

    def _now(self) -> float:
        """The storage's clock (the memory storage's, fake in tests), else the wall clock (a
        Redis storage decides by Redis ``TIME``, near enough to ours)."""
        clock = getattr(self.engine.storage, "clock", None)
        return float(clock()) if callable(clock) else _wall_clock()

    def _reject(self, record: Record) -> Response | None:
        """None for an admitted request; raise the rejection for the app's handler; a 503 for
        a storage outage under ``deny`` (no limit was exceeded)."""
        if record.decision.allowed:
            return None
        if record.failed is None:
            return RejectionResponse(record.decision)
        raise record.exception()

    def _set_headers(self, headers: MutableHeaders, record: Record) -> None:
        """slowapi's headers: ``X-RateLimit-Limit`` / ``-Remaining`` of the most restrictive
        limit, ``-Reset`` the epoch second after it is full again, and ``Retry-After`` (the
        seconds to that, or to when a rejected request would pass); only ``Retry-After`` on
        a rejection when headers are off."""
        decision, now = record.decision, record.now
        rejected = not decision.allowed
        if not (self._headers_enabled or rejected):
            return
        limit_name, remaining_name, reset_name, retry_name = self._header_names
        # In whole microseconds, as the storage counts: near 1.8e9 s a float sum of the epoch
        # and the seconds to a window's end can land a hair before that end.
        now_us = round(now * _MICROS)
        reset_at = 1 + (now_us + round(decision.reset_after * _MICROS)) // _MICROS  # slowapi's
        if self._headers_enabled:
            headers[limit_name] = str(decision.limit)
            headers[remaining_name] = str(decision.remaining)
            headers[reset_name] = str(reset_at)
        if rejected:
            wait = retry_after_seconds(decision.retry_after)
        else:
            wait = (reset_at * _MICROS - now_us) // _MICROS
        if rejected and wait == 0:
            return  # too large for the limit: waiting cannot help
        if self._retry_after == "http-date":
            headers[retry_name] = formatdate(now + wait, usegmt=True)
        else:
            headers[retry_name] = str(wait)

    def _check_routes(self, app: Any) -> None:
        """At start-up: the decorated FastAPI routes whose ``request`` FastAPI will not fill
        with the request (or, with headers on, whose ``response`` not with the response).
        slowapi fails on each of them at every request; here the app does not start.

        Raises:
            ConfigError: naming the route and the parameter.
        """
        for path, route in all_routes(getattr(app, "routes", ())):
            endpoint = getattr(route, "endpoint", None)
            # A FastAPI route (it has a dependant) fills parameters by their annotations.
            if (
                endpoint is None
                or not hasattr(endpoint, _GROUPS)
                or getattr(route, "dependant", None) is None
            ):
                continue
            parameters = resolved_signature(endpoint).parameters
            request = parameters.get("request")
            if request is not None and not is_request(request.annotation):
                raise ConfigError(
                    f"{path}: parameter `request` must be an instance of "
                    "starlette.requests.Request: annotate it `request: Request` (FastAPI "
                    "fills a `request` of any other type from the query string)"
                )
            response = parameters.get("response")
            if self._headers_enabled and response is not None:
                annotation = response.annotation
                if not (isinstance(annotation, type) and issubclass(annotation, Response)):
                    raise ConfigError(
                        f"{path}: parameter `response` must be an instance of "
                        "starlette.responses.Response: annotate it `response: Response` or "
                        "rename it (slowapi fails on it at every request with headers on)"
                    )

    def _run(self, job: Callable[[RateLimiter], Coroutine[Any, Any, T]]) -> T:
        """``job`` on this limiter's storage, from sync code: memory answers without
        suspending; Redis gets a connection of its own in a worker thread (the limiter's
        belongs to the app's event loop)."""
        if isinstance(self.engine.storage, MemoryStorage):
            return _completed(job(self.engine))

        async def on_own_connection() -> T:
            storage = storage_from_url(
                self._storage_url, fallback="none", prefix=self._key_prefix or None
            )
            async with RateLimiter(storage, overlimit_cache=False) as engine:
                return await job(engine)

        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            return worker.submit(asyncio.run, on_own_connection()).result()

    def _endpoint_key(self, scope: Scope, endpoint: Any) -> str:
        """The route's own counter name: its URL, or its function (``key_style``)."""
        if self._key_style == "url":
            return str(scope["path"])
        return f"{endpoint.__module__}.{getattr(endpoint, '__name__', endpoint)}"

    def _middleware_groups(self, endpoint: Any) -> list[LimitGroup]:
        """What the middleware checks for a route: nothing for a decorated or exempt one."""
        if endpoint is None or hasattr(endpoint, _GROUPS) or hasattr(endpoint, _EXEMPT):
            return []
        return [*self._application_limits, *self._default_limits]


class _StorageView:
    """``limiter._storage``: what slowapi's tests and tools read there. ``get`` takes
    slowapi's key text (``LIMITER/<key>/<url or function>/<amount>/<multiple>/<unit>``, as
    its documentation shows them) and answers the count spent; ``reset`` forgets all."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def get(self, key: str) -> int:
        limiter = self._limiter
        rest = key.removeprefix("LIMITER/")
        if limiter._key_prefix:
            rest = rest.removeprefix(limiter._key_prefix + "/")
        parts = rest.rsplit("/", 3)
        if rest == key or len(parts) != 4:
            raise ConfigError(
                f"expected a key like 'LIMITER/<key>/<scope>/1/1/minute', got {key!r}"
            )
        client, _, scope = parts[0].partition("/")
        rate = parse_rate(f"{parts[1]}/{parts[2]} {parts[3]}")
        counter = state_key(storage_id(client), scope)
        decision = limiter._run(lambda engine: engine.hit(counter, rate, 0, limiter._algorithm))
        return decision.limit - decision.remaining

    def reset(self) -> None:
        self._limiter.reset()


class _Settings:
    """The ``RATELIMIT_*`` settings, each checked as it is read."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def text(self, name: str) -> str | None:
        value = self._config(name, default=None)
        return None if value is None else str(value)

    def flag(self, name: str, default: bool) -> bool:
        try:
            return bool(self._config(name, cast=bool, default=default))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def limits(self, name: str) -> list[RateSource]:
        value = self.text(name)
        return [] if value is None else [value]


def _failed_limit(
    decision: Decision, rates: Sequence[Any], owners: Sequence[LimitGroup]
) -> Limit | None:
    """The rate that rejected the request, and its group: the one that waits the longest
    (the states come in the order of the limits, each with one per rate)."""
    states = iter(decision.states)
    worst: Limit | None = None
    longest = 0.0
    for limit_rates, group in zip(rates, owners, strict=True):
        for rate in as_rates(limit_rates):
            state = next(states)
            if state.retry_after > longest:
                worst, longest = Limit(rate, group), state.retry_after
    return worst


def _completed(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (the memory storage), without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("the memory storage suspended: it never should")

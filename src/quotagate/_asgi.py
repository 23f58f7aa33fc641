"""ASGI plumbing shared by the adapters: ``asgi.RateLimitMiddleware``, ``fastapi.Limiter``
and the gateway.

A request's limits are decided by ``decide`` (who the client is, then one storage call; a
storage error is a 503 decision, never a 500). The decision is kept in the scope
(``record_decision``) until the response starts, where ``with_rate_limit_headers`` adds its
headers to whatever the app answers: success, error or stream. A rejection is answered by
``RejectionResponse``, which carries the headers itself and takes the decisions out of the
scope, so no wrapper adds them twice.

This module sits below the adapters: it imports from the engine, identity, http and
Starlette, never from ``asgi`` or ``fastapi``.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ._types import Algorithm, Message, Scope, Send
from .decision import Decision, combine
from .errors import StorageError
from .http import Headers, rate_limit_headers, rejection
from .identity import KeyFunc, TrustedProxies, display_key, settled_key, storage_id
from .keys import state_key
from .limiter import Hit, RateLimiter
from .rates import RateLike

__all__ = [
    "Limit",
    "RawResponse",
    "RejectionResponse",
    "decide",
    "maybe_await",
    "record_decision",
    "send_rejection",
    "storage_error_decision",
    "with_rate_limit_headers",
]

logger = logging.getLogger("quotagate")


class _LastResort(logging.Handler):
    """quotagate's set-up warnings as ``WARNING quotagate: ...`` on stderr, for an app that
    configured no logging: only when no other handler would take the record.

    Plain uvicorn configures its own loggers and leaves the root logger bare, so without this
    a warning of ours would reach ``logging.lastResort``, which prints the message without its
    level. Any handler the app adds (``basicConfig``, the gateway's, pytest's) silences this
    one. No level of its own: the ``quotagate`` logger's (WARNING, from the root, unless the
    app sets DEBUG for it) decides.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        found: logging.Logger | None = logging.getLogger(record.name)
        while found is not None:
            if any(handler is not self for handler in found.handlers):
                return False
            found = found.parent if found.propagate else None
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # the stderr of now, as lastResort's
        except Exception:
            self.handleError(record)


if not any(isinstance(handler, _LastResort) for handler in logger.handlers):
    logger.addHandler(_LastResort())

#: Scope key under which the decisions taken for a request are kept until its response starts.
DECISIONS = "quotagate.decisions"

#: One limit of a request, its rates and cost already settled: the key function that says who
#: the client is, the counter's name, the rates, the cost and the algorithm.
Limit = tuple[KeyFunc, str, RateLike, int, Algorithm]


async def maybe_await(value: Any) -> Any:
    """The value, awaited if it is awaitable: user callbacks may be sync or async."""
    return await value if inspect.isawaitable(value) else value


async def decide(
    engine: RateLimiter, request: Request, limits: Sequence[Limit], trusted: TrustedProxies
) -> Decision:
    """Decide every limit of a request in one storage call.

    Args:
        engine: the engine to decide with; started here on the first decision.
        request: the request; each limit's key function is called with it.
        limits: at least one; checked together, all or nothing.
        trusted: the proxies believed when a key function cannot tell who the client is
            (it answered None: the client is counted by address).

    Returns:
        The decision. A storage error is logged and becomes ``storage_error_decision()``
        (503, retry in a second): never raised.
    """
    hits: list[tuple[str, RateLike, int, Algorithm]] = []
    for key_func, name, rates, cost, algorithm in limits:
        key = key_func(request)
        if not isinstance(key, str):  # async, None or not text
            key = await settled_key(key, request, trusted)
        if logger.isEnabledFor(logging.DEBUG):
            scope = request.scope
            logger.debug(
                "quotagate: %s %s -> client %s", scope["method"], scope["path"], display_key(key)
            )
        hits.append((state_key(storage_id(key), name), rates, cost, algorithm))
    try:
        if not engine.started:
            await engine.start()
        if len(hits) == 1:  # the common case, without building Hit objects
            return await engine.hit(*hits[0])
        return await engine.hit_many([Hit(*hit) for hit in hits])
    except StorageError as exc:
        logger.error("quotagate: storage error, answering 503: %s", exc)
        return storage_error_decision()


def storage_error_decision() -> Decision:
    """What an unrecoverable storage error turns into: 503, retry in a second (never a 500)."""
    return Decision(False, "unavailable", 1.0, 0, 0, 0.0, ())


def record_decision(scope: Scope, decision: Decision) -> None:
    """Keep a decision for the response's headers (``with_rate_limit_headers`` adds them)."""
    scope.setdefault(DECISIONS, []).append(decision)


async def send_rejection(scope: Scope, send: Send, decision: Decision) -> None:
    """Answer the request with the decision's rejection (429, or 503 for a storage outage)."""
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

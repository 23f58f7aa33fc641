"""slowapi's middlewares: default and application limits for the routes without a decorator,
and the rate-limit headers on every response of a decided request.

Both are the same pure ASGI middleware (slowapi's ``SlowAPIMiddleware`` is a
``BaseHTTPMiddleware``, which is why it took only sync exception handlers; both take either
here). Added as slowapi's are, ``app.add_middleware(SlowAPIMiddleware)``, they find the limiter
at ``app.state.limiter``. When the app starts (its lifespan, or the first request when the
server runs none) they check the set-up and refuse to start on a mistake: no limiter on the
app, a decorated FastAPI endpoint whose ``request`` is not the request. They close the
limiter's storage at the app's shutdown.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response

from .._asgi import maybe_await
from .._routes import app_handler, find_endpoint, warn_unlimited_routes
from .._types import ASGIApp, Message, Receive, Scope, Send
from ..errors import ConfigError
from .errors import RateLimitExceeded
from .extension import MIDDLEWARE, Limiter, Record, _rate_limit_exceeded_handler

__all__ = ["SlowAPIASGIMiddleware", "SlowAPIMiddleware"]


class SlowAPIASGIMiddleware:
    """Default and application limits, the headers, and the set-up checks (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._checked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        limiter = self._limiter(app)
        scope[MIDDLEWARE] = True
        if limiter.enabled and limiter._auto_check:
            answer = await self._check(limiter, app, scope, receive)
            if answer is not None:
                await answer(scope, receive, _with_headers(scope, send))
                return
        await self.app(scope, receive, _with_headers(scope, send))

    def _limiter(self, app: Any) -> Limiter:
        """The app's limiter, the routes checked once (until they pass, every request fails:
        the app is not set up to serve)."""
        limiter = getattr(getattr(app, "state", None), "limiter", None)
        if not isinstance(limiter, Limiter):
            raise ConfigError(
                f"{type(self).__name__} needs the limiter on the app: app.state.limiter = "
                f"limiter (a quotagate.slowapi Limiter; found {limiter!r})"
            )
        if not self._checked:
            limiter._check_routes(app)
            warn_unlimited_routes(app.routes, limiter._wrapped)
            self._checked = True
        return limiter

    async def _check(
        self, limiter: Limiter, app: Any, scope: Scope, receive: Receive
    ) -> Response | None:
        """The default and application limits of a route without a decorator: the app's
        handler's answer (slowapi's by default) when they reject, else None."""
        endpoint, _ = find_endpoint(app.routes, scope)
        groups = limiter._middleware_groups(endpoint)
        if not groups:
            return None
        request = Request(scope, receive)
        record = await limiter._check(request, groups, limiter._endpoint_key(scope, endpoint))
        if record is None:
            return None
        try:
            return limiter._reject(record)
        except RateLimitExceeded as exc:
            handler = app_handler(scope, RateLimitExceeded) or _rate_limit_exceeded_handler
            answer: Response = await maybe_await(handler(request, exc))
            return answer

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the set-up at start-up (a mistake fails the start: the server is told
        ``lifespan.startup.failed`` with it, and exits); close the storage before shutdown
        completes."""

        async def receive_checked() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._limiter(scope.get("app"))
                except ConfigError as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"quotagate: {exc}"})
                    raise
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                limiter = getattr(getattr(scope.get("app"), "state", None), "limiter", None)
                if isinstance(limiter, Limiter):
                    await limiter.aclose()
            await send(message)

        await self.app(scope, receive_checked, send_closing)


class SlowAPIMiddleware(SlowAPIASGIMiddleware):
    """slowapi's ``BaseHTTPMiddleware`` one: here the same pure ASGI middleware."""


def _with_headers(scope: Scope, send: Send) -> Send:
    """``send`` that sets the request's rate-limit headers (``request.state.view_rate_limit``)
    at the response start, whoever answered: the endpoint, a handler, this middleware."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            record = scope.get("state", {}).get("view_rate_limit")
            if isinstance(record, Record):
                headers = MutableHeaders(raw=list(message.get("headers", ())))
                record.limiter._set_headers(headers, record)
                message = {**message, "headers": headers.raw}
        await send(message)

    return send_with_headers

"""The gateway's FastAPI app: its routes, and inference straight to the pipeline.

Why: FastAPI's middleware stack, routing and dependency solving cost about a fifth of a
proxied request's CPU, on the one path where every microsecond is taken from the model server's
clients. The inference routes stay declared on the FastAPI app for ``/docs`` and
``/openapi.json``; a method other than POST falls through to FastAPI (405).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..errors import RecordConflict, StorageError
from ..http import EXPOSED_HEADERS
from .admin import ADMIN_ERRORS
from .backends import Route
from .schemas import REQUEST_SCHEMAS

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["INFERENCE_ROUTES", "GatewayApp"]

logger = logging.getLogger("quotagate")

INFERENCE_ROUTES: Mapping[str, Route] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
}
_SUMMARIES: Mapping[Route, str] = {
    "chat": "Chat completion (OpenAI-compatible), rate limited",
    "completions": "Text completion (OpenAI-compatible), rate limited",
}


class GatewayApp(FastAPI):
    """FastAPI for everything but the inference routes, which go straight to the gateway."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway
        self._declare_routes()
        origins = gateway.config.server.cors_allow_origins
        # Browsers calling the gateway directly: preflights answered, and the rate-limit
        # headers readable by the page's code (so it can pace itself). Around everything.
        self._entry: Callable[[Scope, Receive, Send], Awaitable[None]] = (
            CORSMiddleware(
                self._dispatch,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
            if origins
            else self._dispatch
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = INFERENCE_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        try:
            response = await self.gateway.inference(Request(scope, receive), route)
        except ClientDisconnect:
            return  # the client went away: nobody to answer (what it held is settled)
        except Exception:
            logger.exception("quotagate: unexpected error on %s", scope["path"])
            response = self.gateway.errors.response(
                500, "internal_error", "The gateway failed; see its log."
            )
        try:
            await response(scope, receive, send)
        except ClientDisconnect:
            return

    def _declare_routes(self) -> None:
        gateway = self.gateway

        @self.exception_handler(StarletteHTTPException)
        async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
            path = request.url.path
            errors = ADMIN_ERRORS if path.startswith("/admin/") else gateway.errors
            response = errors.http(exc.status_code, exc.detail, request.method, path)
            if exc.headers:
                response.headers.update(exc.headers)  # Allow, on a 405
            return response

        for path, route in INFERENCE_ROUTES.items():
            self.add_api_route(
                path,
                _inference_endpoint(gateway, route),
                methods=["POST"],
                summary=_SUMMARIES[route],
                openapi_extra=REQUEST_SCHEMAS[route],
                response_class=JSONResponse,
            )

        @self.get("/v1/models", summary="Models served behind the gateway")
        async def models() -> Response:
            return await gateway.models()

        @self.get("/v1/ratelimit", summary="The caller's tier and the state of each of its limits")
        async def ratelimit(request: Request) -> Response:
            return await gateway.ratelimit(request)

        @self.get("/health", summary="Liveness, storage mode and version")
        async def health(request: Request) -> Response:
            return await gateway.health(request)

        @self.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
        async def metrics() -> Response:
            return gateway.render_metrics()

        self._declare_admin_routes()

    def _declare_admin_routes(self) -> None:
        """``/admin/*`` (see ``admin``): 404 unless the config has ``[admin]``."""
        admin = self.gateway.admin
        shown = self.gateway.config.admin is not None
        keys, one = "/admin/keys", "/admin/keys/{key_id}"
        options: dict[str, Any] = {"tags": ["admin"], "include_in_schema": shown}

        @self.post(keys, status_code=201, summary="Create an API key", **options)
        async def create_key(request: Request) -> Response:
            return await _answered(admin.create(request))

        @self.get(keys, summary="List the API keys (never a secret)", **options)
        async def list_keys(request: Request) -> Response:
            return await _answered(admin.index(request))

        @self.get(one, summary="One API key (never its secret)", **options)
        async def show_key(request: Request, key_id: str) -> Response:
            return await _answered(admin.show(request, key_id))

        @self.patch(one, summary="Change a key: tier, name, limits, models, expires_at", **options)
        async def update_key(request: Request, key_id: str) -> Response:
            return await _answered(admin.update(request, key_id))

        @self.delete(one, summary="Revoke a key", **options)
        async def revoke_key(request: Request, key_id: str) -> Response:
            return await _answered(admin.revoke(request, key_id))

        @self.post(one + "/rotate", summary="A new secret; the old one for grace_s", **options)
        async def rotate_key(request: Request, key_id: str) -> Response:
            return await _answered(admin.rotate(request, key_id))

        @self.get("/admin/usage", summary="Usage by day, model or key (the ledger)", **options)
        async def usage(request: Request) -> Response:
            return await _answered(admin.usage(request))


async def _answered(work: Awaitable[Response]) -> Response:
    """An admin answer; the storage down is a 503 saying so, never a 500."""
    try:
        return await work
    except RecordConflict:
        return ADMIN_ERRORS.response(
            409, "conflict", "The key was changed meanwhile: read it again, then retry."
        )
    except StorageError as exc:
        logger.error("quotagate: admin API: storage error: %s", exc)
        return ADMIN_ERRORS.response(
            503,
            "storage_unavailable",
            "The storage of keys and usage is unreachable. Try again shortly.",
            [(b"retry-after", b"1")],
            retry_after=1,
        )


def _inference_endpoint(gateway: Gateway, route: Route) -> Callable[[Request], Awaitable[Response]]:
    """The declared route (for ``/docs``); ``GatewayApp`` sends POSTs on without it."""

    async def endpoint(request: Request) -> Response:
        return await gateway.inference(request, route)

    return endpoint

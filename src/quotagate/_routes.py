"""Where a request goes in a Starlette app, mounts and sub-apps included: the route walking
behind ``fastapi.Limiter``.

``Limiter.init_app`` installs one middleware on the outer app, yet a route may sit several
mounts deep, in a sub-app with its own exception handlers. So the limiter asks the app's route
tree: which endpoint will the router call (``default_limits`` apply only to an endpoint without
a limit of its own), which routes registered an endpoint without its decorator
(``@limiter.limit`` above ``@app.get`` limits a copy the app never calls), which mounted apps
lack the outer app's handler for the rejection (each mounted Starlette app has its own
``ServerErrorMiddleware``, which would turn the exception into a 500), and which handler the
app a request is in has for it. Walking the tree is Starlette's business, not the decorator
API's, so it lives here.

This module sits below the adapters: it imports Starlette and ``_types``, never ``asgi`` or
``fastapi``; the exception and its handler come in as arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match, Mount

from ._types import Scope

__all__ = ["all_routes", "app_handler", "find_endpoint", "share_handler", "warn_unlimited_routes"]

logger = logging.getLogger("quotagate")


def app_handler(scope: Scope, exception: type[Exception]) -> Any:
    """The handler for ``exception`` of the app the request is in (a mounted app's, inside a
    mount): the one ``init_app`` installed or the app's own, None without either (or outside a
    Starlette app)."""
    handlers = getattr(scope.get("app"), "exception_handlers", None) or {}
    return handlers.get(exception)


def share_handler(app: Starlette, exception: type[Exception], default: Callable[..., Any]) -> None:
    """Give mounted Starlette apps the app's handler for ``exception`` (``default`` when the
    app has none), unless they have one of their own.

    Each has its own ServerErrorMiddleware, which would answer the exception with a 500
    before it reached the handler ``init_app`` installed on the outer app.
    """
    handler = app.exception_handlers.get(exception, default)
    for route in app.routes:
        if isinstance(route, Mount) and isinstance(route.app, Starlette):
            route.app.exception_handlers.setdefault(exception, handler)
            share_handler(route.app, exception, handler)


def warn_unlimited_routes(routes: Iterable[BaseRoute], wrapped: set[int], prefix: str = "") -> None:
    """Say which routes registered an endpoint without its limit: ``@limiter.limit`` above
    ``@app.get(...)`` limits a copy the app never calls (slowapi's classic silent mistake).

    ``wrapped``: the ids of the functions given a limit, as they were before wrapping.
    """
    for path, route in all_routes(routes, prefix):
        if id(getattr(route, "endpoint", None)) in wrapped:
            logger.warning(
                "quotagate: %s is NOT limited: put @limiter.limit(...) below @app.<method>(...),"
                " next to the function",
                path,
            )


def all_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """Every route of the tree with its full path, mounted ones included (not the mounts)."""
    for route in routes:
        if isinstance(route, Mount):
            yield from all_routes(_mounted_routes(route), prefix + route.path)
        else:
            yield prefix + getattr(route, "path", "?"), route


def find_endpoint(routes: Iterable[BaseRoute], scope: Scope) -> tuple[Any, str]:
    """The endpoint the router will call, and its route path (``*`` when nothing matches)."""
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            if isinstance(route, Mount):
                endpoint, path = find_endpoint(_mounted_routes(route), {**scope, **child})
                return endpoint, route.path + path if endpoint is not None else route.path
            return getattr(route, "endpoint", None), getattr(route, "path", "*")
    return None, "*"


def _mounted_routes(mount: Mount) -> list[BaseRoute]:
    """The routes behind a mount: a Router's, or a mounted app's router's."""
    return mount.routes or getattr(getattr(mount.app, "router", None), "routes", [])

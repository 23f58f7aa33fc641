"""``quotagate.slowapi`` in process (httpx.ASGITransport), on a fake clock: each of slowapi's
documented features that the native API lacked or broke (issue 12), as slowapi's users
write them, with only the imports changed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

import quotagate as qg
from quotagate.slowapi import Limiter, _rate_limit_exceeded_handler
from quotagate.slowapi.errors import RateLimitExceeded
from quotagate.slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from quotagate.slowapi.util import get_ipaddr, get_remote_address
from support import RedisServer, asgi_client

START = 1_800_000_000.0  # FakeClock's: a whole minute, so windows end START + 60 k


def face(clock: qg.FakeClock, **options: Any) -> Limiter:
    """A slowapi Limiter (get_remote_address by default) whose memory storage runs on
    ``clock``."""
    options.setdefault("key_func", get_remote_address)
    limiter = Limiter(**options)
    limiter.engine.storage.clock = clock  # type: ignore[attr-defined]
    return limiter


def app_for(limiter: Limiter, *, middleware: type | None = SlowAPIMiddleware) -> FastAPI:
    """slowapi's set-up: the limiter on app.state, its handler, its middleware."""
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    if middleware is not None:
        app.add_middleware(middleware)
    return app


def one_route(limiter: Limiter, rates: str, app: FastAPI | None = None) -> FastAPI:
    """slowapi's set-up (or ``app``) with one route, GET /t, limited by ``rates``."""
    app = app_for(limiter) if app is None else app

    @app.get("/t")
    @limiter.limit(rates)
    async def t(request: Request) -> dict[str, bool]:
        return {"ok": True}

    return app


async def statuses(app: Any, path: str, n: int, **headers: str) -> list[int]:
    async with asgi_client(app) as client:
        return [(await client.get(path, headers=headers)).status_code for _ in range(n)]


@pytest.mark.parametrize("middleware", [SlowAPIMiddleware, SlowAPIASGIMiddleware])
async def test_default_limits_need_the_middleware_and_get_it(
    clock: qg.FakeClock, middleware: type
) -> None:
    limiter = face(clock, default_limits=["2/minute"])
    app = app_for(limiter, middleware=middleware)

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/free")
    @limiter.exempt
    async def free(request: Request) -> dict[str, bool]:
        return {"ok": True}

    assert await statuses(app, "/plain", 3) == [200, 200, 429]
    assert await statuses(app, "/free", 3) == [200, 200, 200]


async def test_default_limits_without_the_middleware_are_said_to_apply_to_nothing(
    clock: qg.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = face(clock, default_limits=["1/minute"])
    app = app_for(limiter, middleware=None)

    @app.get("/limited")
    @limiter.limit("5/minute")
    async def limited(request: Request) -> dict[str, bool]:
        return {"ok": True}

    with caplog.at_level(logging.WARNING, logger="quotagate"):
        assert await statuses(app, "/limited", 2) == [200, 200]
    said = [r.getMessage() for r in caplog.records if "SlowAPIMiddleware" in r.getMessage()]
    assert len(said) == 1
    assert "NOT limited" in said[0]


async def test_a_limit_provider_of_key_gets_the_key(clock: qg.FakeClock) -> None:
    """slowapi's ``def limit_for(key)`` is called with the key function's answer."""

    def tier(request: Request) -> str:
        return "admin" if request.headers.get("token") == "secret" else "user"

    def limit_for(key: str) -> str:
        return "3/minute" if key == "admin" else "1/minute"

    limiter = face(clock, key_func=tier)
    app = app_for(limiter)

    @app.get("/t")
    @limiter.limit(limit_for)
    async def t(request: Request) -> dict[str, bool]:
        return {"ok": True}

    assert await statuses(app, "/t", 2) == [200, 429]
    assert await statuses(app, "/t", 4, token="secret") == [200, 200, 200, 429]


@pytest.mark.parametrize(("key_style", "second"), [("url", 200), ("endpoint", 429)])
async def test_counters_per_url_by_default_or_per_function(
    clock: qg.FakeClock, key_style: str, second: int
) -> None:
    limiter = face(clock, key_func=lambda: "everyone", key_style=key_style)
    app = app_for(limiter)

    @app.get("/items/{item}")
    @limiter.limit("1/minute")
    async def item(item: str, request: Request) -> dict[str, str]:
        return {"item": item}

    async with asgi_client(app) as client:
        assert (await client.get("/items/a")).status_code == 200
        assert (await client.get("/items/b")).status_code == second
    if key_style == "url":  # slowapi's documented key shape reads the count
        assert limiter._storage.get("LIMITER/everyone//items/a/1/1/minute") == 1


async def test_shared_limit_counts_once_for_its_routes(clock: qg.FakeClock) -> None:
    limiter = face(clock)
    app = app_for(limiter)
    shared = limiter.shared_limit("2/minute", "reads", error_message="reads are rationed")

    @app.get("/a")
    @shared
    async def a(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/b")
    @shared
    async def b(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        assert (await client.get("/a")).status_code == 200
        assert (await client.get("/b")).status_code == 200
        over = await client.get("/a")
    assert over.status_code == 429
    assert over.json() == {"error": "Rate limit exceeded: reads are rationed"}


async def test_methods_per_method_and_override_defaults(clock: qg.FakeClock) -> None:
    limiter = face(clock, default_limits=["1/minute"])
    app = app_for(limiter)

    @app.api_route("/m", methods=["GET", "POST"])
    @limiter.limit("2/minute", methods=["post"], override_defaults=False)
    async def m(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.api_route("/p", methods=["GET", "POST"])
    @limiter.limit("1/minute", per_method=True)
    async def p(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        # GET: only the default (1/minute) applies; POST: the route's 2/minute and the default.
        assert [(await client.get("/m")).status_code for _ in range(2)] == [200, 429]
        assert (await client.post("/m")).status_code == 429  # the default is spent
        # per_method: GET and POST count apart.
        assert [(await client.get("/p")).status_code for _ in range(2)] == [200, 429]
        assert (await client.post("/p")).status_code == 200


async def test_application_limits_are_one_counter_for_every_route(clock: qg.FakeClock) -> None:
    limiter = face(clock, application_limits=["3/minute"])
    app = app_for(limiter)

    @app.get("/x")
    @limiter.limit("10/minute")
    async def x(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/y")
    async def y(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        got = [(await client.get(path)).status_code for path in ("/x", "/y", "/x", "/y")]
    assert got == [200, 200, 200, 429]


@pytest.mark.parametrize(
    ("strategy", "after_20s"),
    [("fixed-window", 429), ("moving-window", 200), ("sliding-window-counter", 200)],
)
async def test_strategies_map_to_fixed_window_or_gcra(
    clock: qg.FakeClock, strategy: str, after_20s: int
) -> None:
    """fixed-window: nothing comes back before the window ends; the others (GCRA): one
    request every period / amount."""
    limiter = face(clock, strategy=strategy)
    app = app_for(limiter)

    @app.get("/s")
    @limiter.limit("3/minute")
    async def s(request: Request) -> dict[str, bool]:
        return {"ok": True}

    assert await statuses(app, "/s", 4) == [200, 200, 200, 429]
    clock.advance(20)
    assert await statuses(app, "/s", 1) == [after_20s]
    clock.advance(40)
    assert (await statuses(app, "/s", 1))[0] == 200


def test_set_up_mistakes_fail_at_construction_or_decoration(clock: qg.FakeClock) -> None:
    with pytest.raises(qg.ConfigError, match="strategy must be one of"):
        Limiter(get_remote_address, strategy="leaky-bucket")
    with pytest.raises(qg.ConfigError, match="key_style"):
        Limiter(get_remote_address, key_style="path")  # type: ignore[arg-type]
    with pytest.raises(qg.ConfigError, match="memcached"):
        Limiter(get_remote_address, storage_uri="memcached://localhost:11211")
    limiter = face(clock)
    with pytest.raises(qg.ConfigError, match="60 per fortnight"):
        limiter.limit("60 per fortnight")
    with pytest.raises(qg.ConfigError, match="takes"):
        limiter.limit("1/minute", key_func=lambda a, b: "x")
    with pytest.raises(qg.ConfigError, match="scope must be a string"):
        limiter.shared_limit("1/minute", lambda: "scope")  # type: ignore[arg-type]
    with pytest.raises(qg.ConfigError, match='No "request" or "websocket" argument'):

        @limiter.limit("1/minute")
        async def no_request() -> None: ...


async def test_zero_argument_callables_and_fractional_costs(clock: qg.FakeClock) -> None:
    """slowapi's key functions and exempt_when of nothing, and a cost of 1.5 per call
    (rounded up to 2): 200s and 429s, never a 500."""
    limiter = face(clock, key_func=lambda: "one client")
    app = app_for(limiter)

    @app.get("/costly")
    @limiter.limit("5/minute", cost=lambda request: 1.5, exempt_when=lambda: False)
    async def costly(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/exempt")
    @limiter.limit("1/minute", exempt_when=lambda: True)
    async def exempt(request: Request) -> dict[str, bool]:
        return {"ok": True}

    assert await statuses(app, "/costly", 3) == [200, 200, 429]
    assert await statuses(app, "/exempt", 3) == [200, 200, 200]


async def test_handlers_reading_detail_or_wrapping_the_sync_handler(clock: qg.FakeClock) -> None:
    limiter = face(clock, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_middleware(SlowAPIASGIMiddleware)

    @app.exception_handler(RateLimitExceeded)
    async def wrapped(request: Request, exc: RateLimitExceeded) -> Response:
        await asyncio.sleep(0)
        response = _rate_limit_exceeded_handler(request, exc)  # slowapi's handler is sync
        response.headers["X-Detail"] = str(exc.detail)
        return response

    one_route(limiter, "1/minute", app)
    async with asgi_client(app) as client:
        await client.get("/t")
        over = await client.get("/t")
    assert over.status_code == 429
    assert over.json() == {"error": "Rate limit exceeded: 1 per 1 minute"}
    assert over.headers["x-detail"] == "1 per 1 minute"
    assert over.headers["retry-after"] == "60"
    assert over.headers["x-ratelimit-reset"] == str(int(START) + 61)


async def test_headers_as_slowapi_sends_them(clock: qg.FakeClock) -> None:
    """Off by default (a 429 still says when to retry); on: Reset an epoch, Retry-After on
    successes too, or an HTTP date with retry_after="http-date"."""
    quiet = face(clock)
    loud = face(clock, headers_enabled=True)
    dated = face(clock, headers_enabled=True, retry_after="http-date")
    for limiter in (quiet, loud, dated):
        app = one_route(limiter, "2/minute")

        async with asgi_client(app) as client:
            ok, _, over = [await client.get("/t") for _ in range(3)]
        if limiter is quiet:
            assert "x-ratelimit-limit" not in ok.headers
            assert "retry-after" not in ok.headers
            assert over.headers["retry-after"] == "60"
        elif limiter is loud:
            assert ok.headers["x-ratelimit-limit"] == "2"
            assert ok.headers["x-ratelimit-remaining"] == "1"
            assert ok.headers["x-ratelimit-reset"] == str(int(START) + 61)  # an epoch
            assert ok.headers["retry-after"] == "61"
        else:
            when = parsedate_to_datetime(ok.headers["retry-after"]).timestamp()
            assert when == START + 61


async def test_headers_without_a_middleware_on_the_response_parameter(
    clock: qg.FakeClock,
) -> None:
    """slowapi's documented way for an endpoint that returns data: ``response: Response``."""
    limiter = face(clock, headers_enabled=True)
    app = app_for(limiter, middleware=None)

    @app.get("/data")
    @limiter.limit("5/minute")
    async def data(request: Request, response: Response) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        got = await client.get("/data")
    assert got.headers["x-ratelimit-remaining"] == "4"


async def test_sync_reset_forgets_every_counter(clock: qg.FakeClock) -> None:
    limiter = face(clock)
    app = one_route(limiter, "1/minute")

    assert await statuses(app, "/t", 2) == [200, 429]
    limiter.reset()  # sync, as slowapi's, inside a running event loop
    assert await statuses(app, "/t", 1) == [200]


@pytest.mark.redis
async def test_redis_key_prefix_reset_and_the_deny_default(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """On Redis: ``key_prefix`` starts every key, a sync ``reset()`` empties them from inside
    the loop; with Redis gone the default (no fallback) is a 503, ``swallow_errors`` admits."""
    limiter = Limiter(get_remote_address, storage_uri=redis_server.url, key_prefix=key_prefix)
    app = one_route(limiter, "1/minute")

    assert await statuses(app, "/t", 2) == [200, 429]
    keys = redis.Redis.from_url(redis_server.url).keys(f"{key_prefix}:*")
    assert len(keys) == 1
    limiter.reset()
    assert redis.Redis.from_url(redis_server.url).keys(f"{key_prefix}:*") == []
    assert await statuses(app, "/t", 1) == [200]
    await limiter.aclose()

    gone = "redis://127.0.0.1:1/0"
    for swallow, expected in ((False, 503), (True, 200)):
        down = Limiter(get_remote_address, storage_uri=gone, swallow_errors=swallow)
        down_app = one_route(down, "1/minute")

        assert await statuses(down_app, "/t", 1) == [expected]
        await down.aclose()


async def test_in_memory_fallback_limits_apply_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = Limiter(
        get_remote_address, storage_uri="redis://127.0.0.1:1/0", in_memory_fallback=["1/minute"]
    )
    app = one_route(limiter, "10/minute")

    with caplog.at_level(logging.ERROR, logger="quotagate"):
        # The first decision finds Redis down (in memory, by the route's limit); then the
        # fallback's own 1/minute holds, and counts that request: a limit that changes keeps
        # what was counted in its period.
        assert await statuses(app, "/t", 3) == [200, 429, 429]
    await limiter.aclose()


async def test_environment_settings_and_a_positional_key_func(
    clock: qg.FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATELIMIT_DEFAULT", "1/minute")
    monkeypatch.setenv("RATELIMIT_HEADERS_ENABLED", "true")
    limiter = Limiter(get_ipaddr)
    limiter.engine.storage.clock = clock  # type: ignore[attr-defined]
    app = app_for(limiter)

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        first = await client.get("/plain", headers={"X_FORWARDED_FOR": "10.0.0.1"})
        other = await client.get("/plain", headers={"X_FORWARDED_FOR": "10.0.0.2"})
        again = await client.get("/plain", headers={"X_FORWARDED_FOR": "10.0.0.1"})
    assert [first.status_code, other.status_code, again.status_code] == [200, 200, 429]
    assert first.headers["x-ratelimit-limit"] == "1"
    monkeypatch.setenv("RATELIMIT_ENABLED", "maybe")
    with pytest.raises(qg.ConfigError, match="RATELIMIT_ENABLED"):
        Limiter(get_ipaddr)


async def test_the_logger_is_ours_and_names_rejections(
    clock: qg.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = face(clock)
    app = one_route(limiter, "1/minute")

    with caplog.at_level(logging.INFO, logger="quotagate"):
        await statuses(app, "/t", 2)
    assert limiter.logger.name == "quotagate.slowapi"
    assert any("ratelimit 1 per 1 minute exceeded" in r.getMessage() for r in caplog.records)


async def test_a_starlette_app_as_slowapi_documents_it(clock: qg.FakeClock) -> None:
    limiter = face(clock)
    app = Starlette()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIMiddleware)

    @limiter.limit("2/minute")
    def home(request: Request) -> PlainTextResponse:  # a sync endpoint
        return PlainTextResponse("test")

    app.add_route("/home", home)
    assert await statuses(app, "/home", 3) == [200, 200, 429]


@pytest.mark.parametrize(
    ("signature", "problem"),
    [
        ("request: str = None", "parameter `request` must be an instance of"),
        ("request: Request, response: str = None", "parameter `response` must be an instance"),
    ],
)
async def test_endpoints_fastapi_cannot_serve_fail_when_the_app_starts(
    clock: qg.FakeClock, signature: str, problem: str
) -> None:
    """slowapi fails on each request of such a route; here the app does not start: its
    lifespan fails (a server exits), and without a lifespan its first request raises."""
    limiter = face(clock, headers_enabled=True)
    app = app_for(limiter)
    namespace: dict[str, Any] = {"Request": Request}
    exec(f"async def endpoint({signature}):\n    return {{}}", namespace)
    app.get("/t")(limiter.limit("1/minute")(namespace["endpoint"]))
    messages: list[dict[str, Any]] = []
    inbox = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, Any]:
        return next(inbox)

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    with pytest.raises(qg.ConfigError, match=problem):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert messages[0]["type"] == "lifespan.startup.failed"
    assert problem in messages[0]["message"]
    with pytest.raises(qg.ConfigError, match=problem):
        await statuses(app, "/t", 1)


async def test_the_middleware_without_a_limiter_on_the_app_fails_at_the_first_request() -> None:
    app = FastAPI()
    app.add_middleware(SlowAPIMiddleware)

    @app.get("/t")
    async def t() -> dict[str, bool]:
        return {"ok": True}

    with pytest.raises(qg.ConfigError, match=r"app\.state\.limiter = limiter"):
        await statuses(app, "/t", 1)


def _with_handler(handler: Callable[..., Any]) -> Callable[[Request, Exception], Any]:
    return handler


async def test_a_custom_handler_gets_the_exception_for_default_limits_too(
    clock: qg.FakeClock,
) -> None:
    limiter = face(clock, default_limits=["1/minute"])
    app = FastAPI()
    app.state.limiter = limiter
    app.add_middleware(SlowAPIMiddleware)

    def mine(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        return JSONResponse({"slow": exc.detail, "limit": exc.limit.limit.amount}, 429)

    app.add_exception_handler(RateLimitExceeded, _with_handler(mine))

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        await client.get("/plain")
        over = await client.get("/plain")
    assert over.json() == {"slow": "1 per 1 minute", "limit": 1}
    assert over.headers["retry-after"] == "60"

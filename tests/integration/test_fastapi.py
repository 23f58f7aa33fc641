"""The FastAPI library in process (httpx.ASGITransport), with a fake clock."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import quotagate as qg
from quotagate.asgi import RateLimitMiddleware
from quotagate.fastapi import Limiter, RateLimitExceeded
from quotagate.identity import get_remote_address
from support import asgi_client


@pytest.fixture
def limiter(clock: qg.FakeClock) -> Limiter:
    return Limiter(storage=qg.MemoryStorage(clock=clock))


async def test_endpoint_needs_no_request_or_response_parameter(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)

    @app.post("/v1/completions")
    @limiter.limit("2/minute")
    async def completions(body: dict[str, str]) -> dict[str, str]:
        return body

    async with asgi_client(app) as client:
        ok = await client.post("/v1/completions", json={"prompt": "hi"})
        await client.post("/v1/completions", json={"prompt": "hi"})
        over = await client.post("/v1/completions", json={"prompt": "hi"})
        schema = (await client.get("/openapi.json")).json()
    assert ok.json() == {"prompt": "hi"}
    assert ok.headers["x-ratelimit-remaining"] == "1"
    assert over.status_code == 429
    assert over.json()["error"] == "rate_limit_exceeded"
    # The injected request parameter is invisible to the API schema.
    assert "parameters" not in schema["paths"]["/v1/completions"]["post"]


async def test_sync_endpoints_routers_and_request_parameters(limiter: Limiter) -> None:
    app = FastAPI()
    router = APIRouter(prefix="/api")
    limiter.init_app(app)

    @router.get("/sync")
    @limiter.limit("1/minute")
    def sync_endpoint(request: Request) -> dict[str, str]:
        return {"path": request.url.path}

    app.include_router(router)
    async with asgi_client(app) as client:
        first = await client.get("/api/sync")
        second = await client.get("/api/sync")
    assert first.json() == {"path": "/api/sync"}
    assert second.status_code == 429


async def test_mounted_sub_app(limiter: Limiter) -> None:
    app, sub = FastAPI(), FastAPI()
    limiter.init_app(app)

    @sub.get("/thing")
    @limiter.limit("1/minute")
    async def thing() -> dict[str, bool]:
        return {"ok": True}

    @sub.get("/dep", dependencies=[Depends(limiter.depends("1/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    app.mount("/sub", sub)
    async with asgi_client(app) as client:
        for path in ("/sub/thing", "/sub/dep"):
            first = await client.get(path)
            second = await client.get(path)
            assert first.status_code == 200
            assert first.headers["x-ratelimit-limit"] == "1"
            assert second.status_code == 429
            # The main app's handler answers for the sub-app: the seed's body, as is.
            assert second.json()["error"] == "rate_limit_exceeded", path


async def test_headers_on_streaming_and_error_responses(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/stream")
    @limiter.limit("5/minute")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for word in (b"a", b"b", b"c"):
                yield word

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/fails")
    @limiter.limit("5/minute")
    async def fails() -> None:
        raise HTTPException(status_code=418, detail="teapot")

    async with asgi_client(app) as client:
        streamed = await client.get("/stream")
        failed = await client.get("/fails")
    assert streamed.text == "abc"
    assert streamed.headers["x-ratelimit-remaining"] == "4"
    assert failed.status_code == 418
    assert failed.headers["x-ratelimit-remaining"] == "4"
    assert failed.headers["ratelimit-policy"] == '"5-per-minute";q=5;w=60'


async def test_tiered_rates_and_token_costs_from_the_request(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)
    tiers = {"sk-free-000001": "2/minute", "sk-pro-0000001": "100/minute"}

    async def tier_of(request: Request) -> str:  # async rate source
        return tiers[request.headers["x-api-key"]]

    def tokens_of(request: Request) -> int:  # sync cost source
        return int(request.headers.get("x-tokens", "1"))

    @app.post("/v1/completions")
    @limiter.limit(tier_of)
    @limiter.limit("1000/minute", cost=tokens_of, scope="tokens")
    async def completions() -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        free = [
            await client.post("/v1/completions", headers={"x-api-key": "sk-free-000001"})
            for _ in range(3)
        ]
        pro = await client.post(
            "/v1/completions", headers={"x-api-key": "sk-pro-0000001", "x-tokens": "400"}
        )
        too_big = await client.post(
            "/v1/completions", headers={"x-api-key": "sk-pro-0000001", "x-tokens": "5000"}
        )
    assert [r.status_code for r in free] == [200, 200, 429]
    assert pro.status_code == 200
    assert pro.headers["x-ratelimit-limit"] == "1000"  # tokens are the tighter fraction now
    assert pro.headers["x-ratelimit-remaining"] == "600"
    assert too_big.status_code == 429
    assert too_big.json()["error"] == "request_too_large"
    assert "retry-after" not in too_big.headers


async def test_several_limits_on_a_route_are_one_storage_call(clock: qg.FakeClock) -> None:
    calls = 0

    class Counting(qg.MemoryStorage):
        async def decide(self, keys, args, now_us=None):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return await super().decide(keys, args, now_us)

    limiter = Limiter(storage=Counting(clock=clock))
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/")
    @limiter.limit("10/minute")
    @limiter.limit("100/day")
    @limiter.limit("5/second")
    async def root() -> None:
        return None

    async with asgi_client(app) as client:
        response = await client.get("/")
    assert calls == 1
    assert response.headers["ratelimit-policy"].count("-per-") == 3


async def test_scope_shares_a_counter_between_routes(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/a")
    @limiter.limit("3/minute", scope="inference")
    async def a() -> None:
        return None

    @app.get("/b")
    @limiter.limit("3/minute", scope="inference")
    async def b() -> None:
        return None

    @app.get("/c")
    @limiter.limit("3/minute")
    async def c() -> None:
        return None

    async with asgi_client(app) as client:
        statuses = [(await client.get(path)).status_code for path in ("/a", "/b", "/a", "/b")]
        separate = await client.get("/c")
    assert statuses == [200, 200, 200, 429]
    assert separate.status_code == 200


async def test_per_route_key_function_and_exempt_when(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/by-ip")
    @limiter.limit(
        "1/minute",
        key_func=get_remote_address,
        exempt_when=lambda request: request.headers.get("x-internal") == "yes",
    )
    async def by_ip() -> None:
        return None

    async with asgi_client(app) as client:
        await client.get("/by-ip", headers={"x-api-key": "sk-one-111111"})
        # Another key, same address: the route limits by address.
        assert (
            await client.get("/by-ip", headers={"x-api-key": "sk-two-222222"})
        ).status_code == 429
        internal = await client.get("/by-ip", headers={"x-internal": "yes"})
    assert internal.status_code == 200
    assert "x-ratelimit-limit" not in internal.headers


async def test_default_limits_exempt_and_per_route_counters(clock: qg.FakeClock) -> None:
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock), default_limits=["2/minute"])
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/one")
    async def one() -> None:
        return None

    @app.get("/two")
    async def two() -> None:
        return None

    @app.get("/free")
    @limiter.exempt
    async def free() -> None:
        return None

    @app.get("/own")
    @limiter.limit("5/minute")
    async def own() -> None:
        return None

    async with asgi_client(app) as client:
        ones = [(await client.get("/one")).status_code for _ in range(3)]
        two = await client.get("/two")
        frees = [(await client.get("/free")).status_code for _ in range(5)]
        own = await client.get("/own")
    assert ones == [200, 200, 429]
    assert two.status_code == 200
    assert frees == [200] * 5
    assert own.headers["x-ratelimit-limit"] == "5"


async def test_dependency_form(limiter: Limiter) -> None:
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/dep", dependencies=[Depends(limiter.depends("1/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    async with asgi_client(app) as client:
        first = await client.get("/dep")
        second = await client.get("/dep")
    assert first.headers["x-ratelimit-limit"] == "1"
    assert second.status_code == 429
    assert second.json() == {
        "error": "rate_limit_exceeded",
        "message": f"Too many requests. Try again in {second.headers['retry-after']} seconds.",
        "retry_after": int(second.headers["retry-after"]),
    }


async def test_each_header_is_sent_once_whichever_layer_decided(clock: qg.FakeClock) -> None:
    """A rejection from the endpoint, from the dependency form, from default limits, and a
    FastAPI app limited again by an outer ``RateLimitMiddleware``: one of each header."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock), default_limits=["1/minute"])
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/decorated")
    @limiter.limit("1/minute")
    async def decorated() -> None:
        return None

    @app.get("/dep", dependencies=[Depends(limiter.depends("1/minute"))])
    @limiter.exempt
    async def dep() -> None:
        return None

    @app.get("/default")
    async def default() -> None:
        return None

    outer = RateLimitMiddleware(
        app, limiter=qg.RateLimiter(qg.MemoryStorage(clock=clock)), rules=[("/*", "100/minute")]
    )
    names = ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]
    names += ["ratelimit-policy", "ratelimit"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=outer), base_url="http://test"
    ) as client:
        for path in ("/decorated", "/dep", "/default"):
            responses = [await client.get(path) for _ in range(2)]
            assert [r.status_code for r in responses] == [200, 429], path
            for response in responses:
                for name in names:
                    assert len(response.headers.get_list(name)) == 1, (path, name)
                assert len(response.headers.get_list("retry-after")) == (
                    response.status_code == 429
                )
            # Both limits are reported: the outer 100/minute and the route's 1/minute.
            assert responses[0].headers["ratelimit-policy"] == (
                '"100-per-minute";q=100;w=60, "1-per-minute";q=1;w=60'
            )


async def test_headers_can_be_turned_off_and_limiter_disabled(clock: qg.FakeClock) -> None:
    quiet = Limiter(storage=qg.MemoryStorage(clock=clock), headers_enabled=False)
    off = Limiter(storage=qg.MemoryStorage(clock=clock), enabled=False)
    for limiter, expected in ((quiet, [200, 429]), (off, [200, 200])):
        app = FastAPI()
        limiter.init_app(app)

        @app.get("/")
        @limiter.limit("1/minute")
        async def root() -> None:
            return None

        async with asgi_client(app) as client:
            responses = [await client.get("/") for _ in range(2)]
        assert [r.status_code for r in responses] == expected
        assert "x-ratelimit-limit" not in responses[0].headers


async def test_resolved_key_is_logged_masked_at_debug(
    limiter: Limiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="quotagate")
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/")
    @limiter.limit("10/minute")
    async def root() -> None:
        return None

    async with asgi_client(app) as client:
        await client.get("/", headers={"x-api-key": "sk-secret-abcd1234"})
        await client.get("/")
    text = caplog.text
    assert "client sk-…1234" in text
    assert "client ip:127.0.0.1" in text
    assert "secret" not in text


async def test_a_storage_error_is_a_503_never_a_500() -> None:
    from support import asgi_client, free_port

    # Redis without a fallback, and nothing listening: every call fails.
    storage = qg.RedisStorage(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    limiter = Limiter(storage=storage)
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/")
    @limiter.limit("10/minute")
    async def root() -> None:
        return None

    async with asgi_client(app) as client:
        response = await client.get("/")
    await limiter.aclose()
    await storage.aclose()
    assert response.status_code == 503
    assert response.json()["error"] == "rate_limiter_unavailable"
    assert response.headers["retry-after"] == "1"


def test_bad_static_rate_fails_at_decoration_time(limiter: Limiter) -> None:
    with pytest.raises(qg.ConfigError, match="60 per fortnight"):
        limiter.limit("60 per fortnight")


async def test_without_init_app_limits_hold_and_a_warning_says_headers_are_missing(
    clock: qg.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed's own set-up (``app.state.limiter = limiter``, no init_app): the decorator
    still limits (429 with its headers); the missing headers on admitted responses are logged
    once, not left for the reader to discover."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock))
    app = FastAPI()
    app.state.limiter = limiter

    @app.get("/x")
    @limiter.limit("2/minute")
    async def x() -> dict[str, bool]:
        return {"ok": True}

    with caplog.at_level(logging.WARNING, logger="quotagate"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            responses = [await client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert "x-ratelimit-limit" in responses[2].headers
    warnings = [r.getMessage() for r in caplog.records if "init_app" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_rate_limit_exceeded_is_a_quotagate_error() -> None:
    """``except QuotagateError`` catches it, as errors.py's tree draws it."""
    assert issubclass(RateLimitExceeded, qg.QuotagateError)
    assert issubclass(RateLimitExceeded, Exception)


async def test_an_app_handler_for_rate_limit_exceeded_shapes_every_rejection(
    clock: qg.FakeClock,
) -> None:
    """The seed's "exception handler for the 429": registered for ``RateLimitExceeded``, it
    answers rejections of the decorator, the dependency and the default limits alike (in
    mounted sub-apps too), and the rate-limit headers are still added to its answer."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock), default_limits=["1/minute"])
    app = FastAPI()
    limiter.init_app(app)

    async def shaped(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimitExceeded)
        return JSONResponse(
            {"error": "slow_down", "wait": exc.retry_after},
            status_code=429,
            headers={"Retry-After": str(exc.retry_after)},
        )

    app.add_exception_handler(RateLimitExceeded, shaped)

    @app.get("/decorated")
    @limiter.limit("1/minute")
    async def decorated() -> None:
        return None

    @app.get("/dep", dependencies=[Depends(limiter.depends("1/minute"))])
    async def dep() -> None:
        return None

    @app.get("/default")
    async def default() -> None:
        return None

    sub = FastAPI()

    @sub.get("/decorated")
    @limiter.limit("1/minute")
    async def sub_decorated() -> None:
        return None

    app.mount("/sub", sub)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        for path in ("/decorated", "/dep", "/default", "/sub/decorated"):
            first, second = [await client.get(path) for _ in range(2)]
            assert first.status_code == 200, path
            assert second.status_code == 429, path
            assert second.json() == {"error": "slow_down", "wait": 60}, path
            assert second.headers["retry-after"] == "60"
            assert second.headers["x-ratelimit-limit"] == "1"
            assert second.headers["x-ratelimit-remaining"] == "0"
            assert len(second.headers.get_list("x-ratelimit-limit")) == 1


async def test_reset_gives_every_client_a_fresh_start(clock: qg.FakeClock) -> None:
    """``await limiter.reset()``: what a test suite calls between tests (slowapi's reset)."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock))
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/x")
    @limiter.limit("2/minute")
    async def x() -> None:
        return None

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        before = [(await client.get("/x")).status_code for _ in range(3)]
        assert await limiter.reset() == 1
        after = await client.get("/x")
    assert before == [200, 200, 429]
    assert after.status_code == 200
    assert after.headers["x-ratelimit-remaining"] == "1"


async def test_the_dependency_form_without_init_app_answers_429_not_500(
    clock: qg.FakeClock,
) -> None:
    """Without init_app no handler knows RateLimitExceeded: the dependency answers through
    Starlette's HTTPException instead (the seed's body under ``detail``), never a 500."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock))
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(limiter.depends("1/minute"))])
    async def x() -> None:
        return None

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    ) as client:
        first, second = [await client.get("/x") for _ in range(2)]
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["detail"] == {
        "error": "rate_limit_exceeded",
        "message": "Too many requests. Try again in 60 seconds.",
        "retry_after": 60,
    }
    assert second.headers["retry-after"] == "60"
    assert second.headers["x-ratelimit-remaining"] == "0"


async def test_plain_starlette_endpoints_take_the_decorator(clock: qg.FakeClock) -> None:
    """Starlette calls ``endpoint(request)``: sync and async endpoints alike, headers added."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    limiter = Limiter(storage=qg.MemoryStorage(clock=clock))

    @limiter.limit("1/minute")
    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    @limiter.limit("1/minute")
    def blocking(request):  # type: ignore[no-untyped-def]  # unannotated, as Starlette allows
        return PlainTextResponse("sync")

    app = Starlette(routes=[Route("/", home), Route("/sync", blocking)])
    limiter.init_app(app)
    async with asgi_client(app) as client:
        for path, text in (("/", "home"), ("/sync", "sync")):
            first, second = [await client.get(path) for _ in range(2)]
            assert (first.status_code, first.text) == (200, text)
            assert first.headers["x-ratelimit-remaining"] == "0"
            assert second.status_code == 429
            assert second.json()["error"] == "rate_limit_exceeded"


async def test_a_key_function_that_cannot_tell_counts_by_address(clock: qg.FakeClock) -> None:
    """``request.headers.get("x-user")`` is None without the header: those callers are
    counted by their address, each apart (not all as one client, and not a 500)."""
    limiter = Limiter(
        key_func=lambda request: request.headers.get("x-user"),
        storage=qg.MemoryStorage(clock=clock),
    )
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/x")
    @limiter.limit("1/minute")
    async def x() -> None:
        return None

    async with asgi_client(app, "203.0.113.1") as one, asgi_client(app, "203.0.113.2") as two:
        first = [(await one.get("/x")).status_code for _ in range(2)]
        other = (await two.get("/x")).status_code
        named = (await one.get("/x", headers={"x-user": "ann"})).status_code
    assert first == [200, 429]
    assert other == 200
    assert named == 200


async def test_a_limit_above_the_route_decorator_is_named_in_a_warning(
    clock: qg.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """``@limiter.limit`` above ``@app.get`` limits a function the app never calls: the route
    is unlimited. Said once, on the first request, naming the route (a sub-app's included)."""
    limiter = Limiter(storage=qg.MemoryStorage(clock=clock))
    app, sub = FastAPI(), FastAPI()
    limiter.init_app(app)

    @limiter.limit("1/minute")
    @app.get("/upside-down")
    async def upside_down() -> None:
        return None

    @limiter.limit("1/minute")
    @sub.get("/also")
    async def also() -> None:
        return None

    @app.get("/right")
    @limiter.limit("1/minute")
    async def right() -> None:
        return None

    app.mount("/sub", sub)
    with caplog.at_level(logging.WARNING, logger="quotagate"):
        async with asgi_client(app) as client:
            statuses = [(await client.get("/upside-down")).status_code for _ in range(2)]
            await client.get("/right")
    warnings = sorted(r.getMessage() for r in caplog.records if "NOT limited" in r.getMessage())
    assert statuses == [200, 200]  # what the warning is about
    assert [w.split(" is NOT")[0] for w in warnings] == [
        "quotagate: /sub/also",
        "quotagate: /upside-down",
    ]


async def test_callables_of_nothing_or_of_the_key_as_slowapi_writes_them(
    clock: qg.FakeClock,
) -> None:
    """slowapi's conventions, decided at decoration: key functions, exempt_when and costs of
    nothing, a limit provider of the client key (``def limit_for(key)``, which used to get the
    request and fall back to the lower tier), a fractional cost (rounded up)."""
    tiers = {"sk-pro": "3/minute"}

    def tier_key(request: Request) -> str:
        return request.headers.get("x-api-key", "anonymous")

    def limit_for(key: str) -> str:
        return tiers.get(key, "1/minute")

    limiter = Limiter(key_func=tier_key, storage=qg.MemoryStorage(clock=clock))
    app = FastAPI()
    limiter.init_app(app)

    @app.get("/tiered")
    @limiter.limit(limit_for)
    async def tiered() -> None:
        return None

    @app.get("/shared")
    @limiter.limit("3/minute", key_func=lambda: "all", cost=lambda: 1.5, exempt_when=lambda: False)
    async def shared() -> None:
        return None

    async with asgi_client(app) as client:
        pro = [(await client.get("/tiered", headers={"x-api-key": "sk-pro"})).status_code]
        pro += [(await client.get("/tiered", headers={"x-api-key": "sk-pro"})).status_code]
        anonymous = [(await client.get("/tiered")).status_code for _ in range(2)]
        costly = [(await client.get("/shared")).status_code for _ in range(2)]
    assert pro == [200, 200]  # a third would pass too: 3/minute, not the fallback 1/minute
    assert anonymous == [200, 429]
    assert costly == [200, 429]  # 1.5 is charged as 2 of 3


def test_callables_that_cannot_be_called_fail_at_decoration(limiter: Limiter) -> None:
    with pytest.raises(qg.ConfigError, match=r"exempt_when .* takes \(a, b\)"):
        limiter.limit("1/minute", exempt_when=lambda a, b: True)
    with pytest.raises(qg.ConfigError, match="cost must be a non-negative number"):
        limiter.limit("1/minute", cost=-1)
    with pytest.raises(qg.ConfigError, match="algorithm must be"):
        limiter.limit("1/minute", algorithm="leaky")  # type: ignore[arg-type]
    with pytest.raises(qg.ConfigError, match="key_func"):
        Limiter(key_func=lambda a, b: "x")


async def test_default_limits_without_init_app_are_said_to_apply_to_nothing(
    clock: qg.FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """slowapi's set-up without its middleware (``app.state.limiter = limiter`` alone): the
    default limits apply to no route, and the first decision says so."""
    limiter = Limiter(
        storage=qg.MemoryStorage(clock=clock), default_limits=["1/minute"], headers_enabled=False
    )
    app = FastAPI()
    app.state.limiter = limiter

    @app.get("/plain")
    async def plain() -> None:
        return None

    @app.get("/limited")
    @limiter.limit("5/minute")
    async def limited() -> None:
        return None

    with caplog.at_level(logging.WARNING, logger="quotagate"):
        async with asgi_client(app) as client:
            unlimited = [(await client.get("/plain")).status_code for _ in range(2)]
            await client.get("/limited")
    assert unlimited == [200, 200]  # what the warning is about
    said = [r.getMessage() for r in caplog.records if "default_limits" in r.getMessage()]
    assert len(said) == 1
    assert "init_app" in said[0]

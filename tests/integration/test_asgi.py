"""RateLimitMiddleware: pure ASGI, any framework, policy by route rules."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import quotagate as qg
from quotagate.asgi import RateLimitMiddleware, Rule
from support import asgi_client


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def stream(request: Request) -> StreamingResponse:
    async def body() -> Any:
        yield b"x"
        yield b"y"

    return StreamingResponse(body())


def _app(clock: qg.FakeClock, rules: list[Any], **kwargs: Any) -> RateLimitMiddleware:
    inner = Starlette(
        routes=[
            Route("/v1/completions", hello, methods=["POST", "GET"]),
            Route("/v1/chat/completions", stream, methods=["POST"]),
            Route("/health", hello),
            Route("/other", hello),
        ]
    )
    limiter = qg.RateLimiter(qg.MemoryStorage(clock=clock))
    return RateLimitMiddleware(inner, limiter=limiter, rules=rules, **kwargs)


async def test_rules_limit_matching_paths_and_the_first_match_wins(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/health", "600/minute"), ("/v1/*", "2/minute")])
    async with asgi_client(app) as client:
        completions = [(await client.post("/v1/completions")).status_code for _ in range(3)]
        chat = await client.post("/v1/chat/completions")  # shares the /v1/* counter
        health = await client.get("/health")
        other = await client.get("/other")
    assert completions == [200, 200, 429]
    assert chat.status_code == 429
    assert health.headers["x-ratelimit-limit"] == "600"
    assert other.status_code == 200
    assert "x-ratelimit-limit" not in other.headers  # no rule: not limited


async def test_rejection_body_and_headers(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/v1/*", "1/minute")])
    async with asgi_client(app) as client:
        await client.post("/v1/completions")
        over = await client.post("/v1/completions")
    assert over.status_code == 429
    assert over.headers["retry-after"] == "60"
    assert over.json() == {
        "error": "rate_limit_exceeded",
        "message": "Too many requests. Try again in 60 seconds.",
        "retry_after": 60,
    }


async def test_exempt_rule_method_filter_and_cost(clock: qg.FakeClock) -> None:
    rules = [
        ("/v1/chat/*", None),
        Rule("/v1/*", "10/minute", methods=frozenset({"POST"}), cost=lambda r: 4),
    ]
    app = _app(clock, rules)
    async with asgi_client(app) as client:
        exempt = await client.post("/v1/chat/completions")
        get = await client.get("/v1/completions")
        posts = [(await client.post("/v1/completions")).status_code for _ in range(3)]
    assert "x-ratelimit-limit" not in exempt.headers
    assert "x-ratelimit-limit" not in get.headers
    assert posts == [200, 200, 429]  # 4 + 4, then 4 more does not fit in 10


async def test_headers_on_streaming_responses(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/v1/*", "5/minute")])
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions")
    assert response.text == "xy"
    assert response.headers["x-ratelimit-remaining"] == "4"
    assert response.headers["ratelimit"] == '"5-per-minute";r=4;t=12'


async def test_api_keys_are_separate_clients(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/v1/*", "1/minute")])
    async with asgi_client(app) as client:
        a = await client.post("/v1/completions", headers={"x-api-key": "sk-aaaa-111111"})
        b = await client.post("/v1/completions", headers={"authorization": "Bearer sk-bbbb-2222"})
        a_again = await client.post("/v1/completions", headers={"x-api-key": "sk-aaaa-111111"})
    assert (a.status_code, b.status_code, a_again.status_code) == (200, 200, 429)


async def test_trusted_proxies(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/v1/*", "1/minute")], trusted_proxies=["127.0.0.0/8"])
    async with asgi_client(app) as client:
        # httpx's ASGI transport reports the peer as 127.0.0.1: a trusted proxy here.
        first = await client.post("/v1/completions", headers={"x-forwarded-for": "203.0.113.1"})
        second = await client.post("/v1/completions", headers={"x-forwarded-for": "203.0.113.2"})
    assert (first.status_code, second.status_code) == (200, 200)


async def test_non_http_scopes_pass_through(clock: qg.FakeClock) -> None:
    seen: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = RateLimitMiddleware(inner, limiter=qg.RateLimiter(), rules=[("*", "1/minute")])
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await app({"type": "websocket", "path": "/ws"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


def test_bad_rule_rate_fails_at_construction() -> None:
    with pytest.raises(qg.ConfigError, match="sixty"):
        RateLimitMiddleware(JSONResponse({}), rules=[("/v1/*", "sixty/minute")])  # type: ignore[arg-type]


async def test_the_limiter_may_be_a_storage_or_its_url(clock: qg.FakeClock) -> None:
    storage = qg.MemoryStorage(clock=clock)
    by_storage = RateLimitMiddleware(
        Starlette(routes=[Route("/x", hello)]), limiter=storage, rules=[("/x", "1/minute")]
    )
    assert by_storage.limiter.storage is storage
    by_url = RateLimitMiddleware(hello, limiter="memory://", rules=[("/x", "1/minute")])  # type: ignore[arg-type]
    assert isinstance(by_url.limiter.storage, qg.MemoryStorage)


async def test_the_fastapi_limiter_gives_its_engine_and_key_function(clock: qg.FakeClock) -> None:
    """``**limiter.middleware_options()``: the rules count on the FastAPI ``Limiter``'s engine
    (its storage) with its key function and its trusted proxies."""
    from fastapi import FastAPI

    from quotagate.fastapi import Limiter

    storage = qg.MemoryStorage(clock=clock)
    limiter = Limiter(
        key_func=lambda request: request.headers.get("x-user"),
        storage=storage,
        trusted_proxies=["127.0.0.0/8"],
    )
    api = FastAPI()
    limiter.init_app(api)

    @api.get("/ruled")
    async def ruled() -> None:
        return None

    api.add_middleware(
        RateLimitMiddleware, **limiter.middleware_options(), rules=[("/ruled", "2/minute")]
    )
    async with asgi_client(api) as client:
        alice = [
            (await client.get("/ruled", headers={"x-user": "alice"})).status_code for _ in "abc"
        ]
        bob = await client.get("/ruled", headers={"x-user": "bob"})
        # No user: counted by address, the forwarded one (127.0.0.1 is a trusted proxy).
        anonymous = [
            (await client.get("/ruled", headers={"x-forwarded-for": f"203.0.113.{n}"}))
            for n in (1, 1, 2)
        ]
    assert alice == [200, 200, 429]  # counted by the Limiter's key function: per user
    assert bob.status_code == 200
    assert [r.status_code for r in anonymous] == [200, 200, 200]
    assert anonymous[1].headers["x-ratelimit-remaining"] == "0"
    assert anonymous[2].headers["x-ratelimit-remaining"] == "1"

    app = RateLimitMiddleware(api, **limiter.middleware_options(), rules=[("/x", "1/minute")])
    assert app.limiter is limiter.engine
    assert app.trusted is limiter.trusted_proxies


def test_the_fastapi_limiter_itself_is_refused_with_the_way_to_pass_it() -> None:
    """No duck typing: the middleware does not know the FastAPI adapter (a layer above it);
    the error says what was given and how to pass it."""
    from quotagate.fastapi import Limiter

    with pytest.raises(qg.ConfigError) as caught:
        RateLimitMiddleware(hello, limiter=Limiter(), rules=[("/x", "1/minute")])  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith(
        "limiter: expected a RateLimiter, a Storage or a storage URL, got quotagate.fastapi.Limiter"
    )
    assert "**limiter.middleware_options()" in message


def test_a_limiter_of_another_kind_is_a_config_error() -> None:
    with pytest.raises(qg.ConfigError, match=r"limiter: expected .*, got int "):
        RateLimitMiddleware(JSONResponse({}), limiter=42, rules=[("/x", "1/minute")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "above"),
    [
        ("quotagate._asgi", ["quotagate.asgi", "quotagate.fastapi", "quotagate.gateway"]),
        ("quotagate.asgi", ["quotagate.fastapi", "quotagate.gateway"]),
    ],
)
def test_the_asgi_plumbing_imports_no_layer_above_it(module: str, above: list[str]) -> None:
    """``_asgi`` sits below both adapters and ``asgi`` below ``fastapi``: importing one
    loads nothing above it (in a fresh interpreter, so no other test's imports count)."""
    code = f"import sys, {module}; print(sorted(set({above!r}) & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", f"{module} imports {result.stdout.strip()}"


async def test_a_key_function_answering_none_counts_by_address(clock: qg.FakeClock) -> None:
    app = _app(clock, [("/v1/*", "1/minute")], key_func=lambda request: None)

    async with asgi_client(app, "203.0.113.1") as one, asgi_client(app, "203.0.113.2") as two:
        first = [(await one.post("/v1/completions")).status_code for _ in range(2)]
        other = (await two.post("/v1/completions")).status_code
    assert first == [200, 429]
    assert other == 200


async def test_the_engine_is_closed_when_the_app_shuts_down(clock: qg.FakeClock) -> None:
    """The lifespan passes through to the app; at its shutdown the engine lets go of its
    storage (Redis connections)."""
    import asyncio

    app = _app(clock, [("/v1/*", "5/minute")])
    async with asgi_client(app) as client:
        await client.post("/v1/completions")  # connects the engine
    assert app.limiter.started
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: list[str] = []
    for message in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": message})

    async def send(message: dict[str, Any]) -> None:
        outbox.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)  # type: ignore[arg-type]
    assert outbox == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not app.limiter.started

"""RateLimitMiddleware: pure ASGI, any framework, policy by route rules."""

from __future__ import annotations

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


async def test_the_limiter_may_be_a_storage_or_the_fastapi_limiter(clock: qg.FakeClock) -> None:
    """``limiter=`` takes a storage (or its URL) too, or the FastAPI ``Limiter``: then the rules
    count on its engine (its storage) with its key function."""
    from fastapi import FastAPI

    from quotagate.fastapi import Limiter

    storage = qg.MemoryStorage(clock=clock)
    by_storage = RateLimitMiddleware(
        Starlette(routes=[Route("/x", hello)]), limiter=storage, rules=[("/x", "1/minute")]
    )
    assert by_storage.limiter.storage is storage

    limiter = Limiter(key_func=lambda request: request.headers["x-user"], storage=storage)
    api = FastAPI()
    limiter.init_app(api)

    @api.get("/ruled")
    async def ruled() -> None:
        return None

    app = RateLimitMiddleware(api, limiter=limiter, rules=[("/ruled", "2/minute")])
    assert app.limiter is limiter.engine
    async with asgi_client(app) as client:
        alice = [
            (await client.get("/ruled", headers={"x-user": "alice"})).status_code for _ in "abc"
        ]
        bob = await client.get("/ruled", headers={"x-user": "bob"})
    assert alice == [200, 200, 429]  # counted by the Limiter's key function: per user
    assert bob.status_code == 200


def test_a_limiter_of_another_kind_is_a_config_error() -> None:
    with pytest.raises(qg.ConfigError, match="limiter: expected"):
        RateLimitMiddleware(JSONResponse({}), limiter=42, rules=[("/x", "1/minute")])  # type: ignore[arg-type]


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

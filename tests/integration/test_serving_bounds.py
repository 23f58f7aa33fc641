"""The bounds ``quotagate serve`` puts on request heads and request time, for an app served by
uvicorn directly (the README's ``uvicorn.run(app, http=...)``): a real uvicorn on a loopback
socket, in process."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator

import pytest
import uvicorn
from fastapi import FastAPI

from quotagate.fastapi import Limiter
from quotagate.gateway.protocol import BoundedHttpToolsProtocol
from support import free_port


@pytest.fixture
async def served() -> AsyncIterator[int]:
    limiter = Limiter()
    app = FastAPI()
    limiter.init_app(app)

    @app.post("/v1/completions")
    @limiter.limit("60/minute")
    async def completions(body: dict[str, str]) -> dict[str, str]:
        return body

    port = free_port()
    protocol = functools.partial(
        BoundedHttpToolsProtocol, max_header_bytes=4096, request_timeout_s=0.5
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:  # noqa: ASYNC110 (uvicorn.Server has a flag, no event)
            await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_a_stalled_request_gets_408_a_huge_head_431_a_whole_one_its_answer(
    served: int,
) -> None:
    body = b'{"prompt": "hi"}'
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    whole, stalled, huge = await asyncio.gather(
        exchange(served, head + body),
        exchange(served, head + body[:5]),
        exchange(served, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"),
    )
    assert whole.startswith(b"HTTP/1.1 200 ")
    assert b"x-ratelimit-limit: 60" in whole
    assert stalled.startswith(b"HTTP/1.1 408 ")
    # The library's shape (the seed tutorial's), as the app's own 429s are.
    assert json.loads(stalled.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
    assert huge.startswith(b"HTTP/1.1 431 ")

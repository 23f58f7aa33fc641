"""The gateway's upstream HTTP/1.1 client against hand-written servers on loopback sockets:
keep-alive reuse, chunked and read-to-close bodies, a server closing idle connections, the
pool bound, timeouts, refusals, garbage, and abandoned streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from quotagate.gateway.backends import UpstreamError
from quotagate.gateway.backends.http1 import Http1Pool
from quotagate.testing import async_wait_until
from support import free_port

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


class Server:
    """A loopback server that reads each request (head and Content-Length body) and lets a
    handler answer it; counts connections and the requests it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                if not await self.handler(head + body, writer):
                    return
        finally:
            self.open -= 1
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        port = free_port()
        server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.close()
            for writer in self.writers:
                writer.close()


def json_answer(payload: object, *, close: bool = False) -> bytes:
    body = json.dumps(payload).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n" % len(body)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


async def answer_ok(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(json_answer({"ok": True}))
    await writer.drain()
    return True


async def test_requests_reuse_one_kept_alive_connection() -> None:
    server = Server(answer_ok)
    async with server.running() as url:
        pool = Http1Pool(url)
        for _ in range(5):
            response = await pool.request("POST", "/chat/completions", b'{"a": 1}')
            assert response.status == 200
            assert json.loads(await response.read()) == {"ok": True}
        await pool.aclose()
    assert server.connections == 1
    assert len(server.requests) == 5
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 8\r\n" in first
    assert first.endswith(b'{"a": 1}')


async def test_a_chunked_body_arrives_whole_and_piece_by_piece() -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the client side
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    server = Server(chunked)
    async with server.running() as url:
        pool = Http1Pool(url)
        response = await pool.request("POST", "/completions", b"{}")
        received = [chunk async for chunk in response.chunks()]
        assert b"".join(received) == b"".join(pieces)
        assert len(received) >= 2  # streamed, not buffered whole
        again = await pool.request("POST", "/completions", b"{}")  # same connection
        assert await again.read() == b"".join(pieces)
        await pool.aclose()
    assert server.connections == 1


async def test_a_body_read_until_the_server_closes() -> None:
    async def until_close(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        writer.write(b'{"partial": ')
        await writer.drain()
        writer.write(b"true}")
        await writer.drain()
        return False  # close: that ends the body

    server = Server(until_close)
    async with server.running() as url:
        pool = Http1Pool(url)
        for _ in range(2):
            response = await pool.request("GET", "/models")
            assert json.loads(await response.read()) == {"partial": True}
        await pool.aclose()
    assert server.connections == 2  # Connection: close is honoured


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    server = Server(answer_ok)
    async with server.running() as url:
        pool = Http1Pool(url)
        assert (await pool.request("POST", "/completions", b"{}")).status == 200
        for writer in server.writers:  # the server drops its idle keep-alive connection
            writer.close()
        await asyncio.sleep(0.05)
        response = await pool.request("POST", "/completions", b"{}")
        assert json.loads(await response.read()) == {"ok": True}
        await pool.aclose()
    assert server.connections == 2
    assert len(server.requests) == 2  # nothing was sent twice


async def test_the_pool_never_opens_more_than_max_connections() -> None:
    release = asyncio.Event()

    async def held(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return await answer_ok(request, writer)

    server = Server(held)
    async with server.running() as url:
        pool = Http1Pool(url, max_connections=2)

        async def one() -> int:
            response = await pool.request("POST", "/completions", b"{}")
            await response.read()
            return response.status

        calls = [asyncio.create_task(one()) for _ in range(5)]
        await async_wait_until(lambda: len(server.requests) == 2, 10, "two requests arrived")
        await asyncio.sleep(0.05)  # room for a third connection, if the pool were to open one
        assert server.open == 2
        assert len(server.requests) == 2
        release.set()
        assert await asyncio.gather(*calls) == [200] * 5
        await pool.aclose()
    assert server.most_open == 2


async def test_a_silent_server_times_out_as_504() -> None:
    async def silent(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    server = Server(silent)
    async with server.running() as url:
        pool = Http1Pool(url, timeout=0.2)
        with pytest.raises(UpstreamError) as raised:
            await pool.request("POST", "/completions", b"{}")
        assert raised.value.status == 504
        assert raised.value.error == "upstream_timeout"
        await pool.aclose()


async def test_a_stalled_body_times_out_as_504() -> None:
    async def stall(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)
        return False

    server = Server(stall)
    async with server.running() as url:
        pool = Http1Pool(url, timeout=0.2)
        response = await pool.request("POST", "/completions", b"{}")
        with pytest.raises(UpstreamError) as raised:
            await response.read()
        assert raised.value.status == 504
        await pool.aclose()


async def test_nobody_listening_is_502_upstream_unavailable() -> None:
    pool = Http1Pool(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UpstreamError) as raised:
        await pool.request("GET", "/models")
    assert raised.value.status == 502
    assert raised.value.error == "upstream_unavailable"


async def test_garbage_instead_of_http_is_502() -> None:
    async def garbage(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        return False

    server = Server(garbage)
    async with server.running() as url:
        pool = Http1Pool(url)
        with pytest.raises(UpstreamError) as raised:
            await pool.request("POST", "/completions", b"{}")
        assert raised.value.status == 502
        await pool.aclose()


async def test_a_stream_abandoned_midway_closes_its_connection() -> None:
    async def endless(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(1000):
                writer.write(b"6\r\nevent\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.005)
        except ConnectionError:
            pass
        return False

    server = Server(endless)
    async with server.running() as url:
        pool = Http1Pool(url)
        response = await pool.request("POST", "/completions", b"{}")
        chunks = response.chunks()
        assert (await anext(chunks)).startswith(b"event")
        await chunks.aclose()  # the client went away: the rest of that body is never read
        # Closed, not put back with a body half read (a pooled one would stay open).
        await async_wait_until(lambda: server.open == 0, 10, "the connection closed")
        await pool.aclose()

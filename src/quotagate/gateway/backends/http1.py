"""A lean keep-alive HTTP/1.1 client for the model server: asyncio protocols and httptools.

Why not httpx: in front of a fast model server its per-request cost dominated the gateway
(``benchmarks/gateway.py`` measured ~2 ms of CPU per proxied request, three quarters of it in
httpx/httpcore/anyio: a pool scan that polls every idle socket, anyio stream wrappers, header
models). Here a connection is a protocol object fed by the event loop; the response parser
(llhttp in C, as uvicorn uses) hands over the status, headers and de-chunked body pieces; the
request is one pre-rendered ``bytes`` write. A request costs a future or two, no task.

Scope: what an OpenAI-compatible server needs -- one origin, ``http`` or ``https``, request
bodies of known length, responses with Content-Length, chunked or read-to-close bodies,
keep-alive with a bounded pool, connect and read timeouts, streaming with backpressure.
Every failure is an ``UpstreamError`` (502 down or broken, 504 timed out).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from . import UpstreamError

__all__ = ["Http1Pool", "Http1Response"]

#: Buffered, unread body bytes above which a connection stops reading from its socket.
_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One socket to the model server; carries one exchange at a time."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # against the pool's size (set once connected)
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.received = False  # any byte of this exchange's response arrived
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.error: UpstreamError | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError(502, "upstream_error", "the model server upgraded"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(502, "upstream_error", f"bad HTTP from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.pool._forget(self)
        if self.complete:
            return
        if self.headers_done and self._until_close():
            self._finish()  # the body was "everything until the server closes"
            return
        self._fail(
            UpstreamError(
                502,
                "upstream_error",
                "the model server closed the connection"
                + (" mid-response" if self.received else " without answering"),
            )
        )

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._finish()

    # -- internals -------------------------------------------------------------------------------

    def _until_close(self) -> bool:
        return not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        )

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something happens on the exchange (headers, body, end, error), or the pool's
        read timeout passes with nothing (TimeoutError)."""
        if self.error is not None:
            raise self.error
        loop = self.pool.loop
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(self.pool.timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        """Every buffered body piece, joined; resumes reading if it was paused."""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


def _write(conn: _Connection, message: bytes) -> bool:
    """Write the request; False when the connection turned out closed (nothing was sent)."""
    transport = conn.transport
    if conn.closed or transport is None or transport.is_closing():
        return False
    try:
        transport.write(message)
    except (RuntimeError, OSError):  # uvloop: "unable to perform operation on ... closed"
        conn._fail(UpstreamError(502, "upstream_unavailable", "closed before the request"))
        return False
    return True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Http1Response:
    """A response whose headers have arrived; read it whole or piece by piece, then close."""

    def __init__(self, conn: _Connection, url: str) -> None:
        self._conn = conn
        self._url = url
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: bytes, default: str = "") -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return default

    async def read(self) -> bytes:
        parts = [piece async for piece in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    continue
                if conn.complete:
                    break
                await self._wait()
        finally:
            self.close()

    async def _wait(self) -> None:
        try:
            await self._conn.wait()
        except TimeoutError:
            self._conn._fail(UpstreamError(504, "upstream_timeout", "timeout"))
            raise UpstreamError(
                504, "upstream_timeout", f"the model server at {self._url} timed out"
            ) from None

    def close(self) -> None:
        """Give the connection back to the pool (whole answer read) or close it (not read)."""
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            conn.pool._put(conn)


class Http1Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` at a time."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL (got {url!r})")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.base_path = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.ssl else 80
        host_header = host if self.port == default_port else f"{host}:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = f"Host: {host_header}\r\nAccept: */*\r\n{extra}".encode("latin-1")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, method: str, path: str, body: bytes | None = None) -> Http1Response:
        """Send a request and wait for the response's headers.

        A kept-alive connection found closed before the request could be written on it is
        replaced by a fresh one. Once written, a request is never sent again: a server that
        then closes without answering may have started it (a model server would generate
        twice), so that is an ``UpstreamError`` for the caller.
        """
        head = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1") + self._head_tail
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        message = head + b"\r\n" + (body or b"")
        for attempt in (1, 2):
            conn = await self._get()
            conn._reset()
            if not _write(conn, message):  # closed under us: nothing was sent
                self._put(conn)
                if attempt == 1:
                    continue
                raise UpstreamError(
                    502,
                    "upstream_unavailable",
                    f"the model server at {self.url} closed the connection before the request",
                    unsent=True,
                )
            try:
                while not conn.headers_done:
                    await conn.wait()
            except TimeoutError:
                conn._fail(UpstreamError(504, "upstream_timeout", "timeout"))
                self._put(conn)
                raise UpstreamError(
                    504, "upstream_timeout", f"the model server at {self.url} timed out"
                ) from None
            except UpstreamError:
                self._put(conn)
                raise
            except BaseException:
                conn._fail(UpstreamError(502, "upstream_error", "cancelled"))
                self._put(conn)
                raise
            return Http1Response(conn, self.url)
        raise AssertionError("unreachable")

    async def _get(self) -> _Connection:
        """An idle kept-alive connection, else a new one once the pool has room."""
        while (conn := self._take_idle()) is None and self._open >= self.max_connections:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # it was woken for a slot it will not take: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        if conn is not None:
            return conn
        self._open += 1
        try:
            _, fresh = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl
                ),
                self.connect_timeout,
            )
        except BaseException as exc:
            self._open -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    504,
                    "upstream_timeout",
                    f"connecting to the model server at {self.url} timed out",
                    unsent=True,
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamError(
                    502,
                    "upstream_unavailable",
                    f"cannot connect to the model server at {self.url}",
                    unsent=True,
                ) from None
            raise
        fresh.counted = True
        return fresh

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _put(self, conn: _Connection) -> None:
        """Back to the pool when its exchange is over and it can carry another; else close it."""
        if conn.closed:
            return  # connection_lost already forgot it
        if conn.complete and conn.keep_alive and conn.error is None and not conn.chunks:
            self._idle.append(conn)
            self._wake_one()
            return
        conn.keep_alive = False
        if conn.transport is not None:
            conn.transport.close()  # connection_lost does the bookkeeping

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (by either side): it no longer counts against the pool."""
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let connection_lost run

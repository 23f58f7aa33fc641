"""One Redis connection, auto-pipelined: the hot path of RedisStorage.

Every decision is one EVALSHA. Sent through redis-py's client or pipeline objects, each command
costs tens of microseconds of Python (pool checkout, a timeout context per reply, response
callbacks). Here a command is packed once, written to the socket at once when nothing is in
flight, or else coalesced with the others that arrive in the same loop iteration into one write;
replies are parsed by hiredis in C and matched to callers in order. Concurrent callers thus share
round trips with no batching delay, and a caller that gives up (timeout) leaves its reply to be
read and dropped, so the connection never falls out of step.

redis-py is still used for everything else (start-up, script loading, releases, Cluster).
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

from ..errors import ConfigError, StorageError

__all__ = ["PipelinedConnection", "pack_command"]


def pack_command(args: Sequence[str | int | bytes]) -> bytes:
    """RESP encoding of one command: ``*N`` then ``$len`` + bytes for each argument."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._buffer: list[bytes] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            reply = reader.gets()
            if reply is False:
                return
            future = waiters.popleft()
            if future.done():
                continue  # its caller gave up (timeout): the reply is read and dropped
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("Redis closed the connection")
        self.transport = None
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(StorageError(f"Redis connection lost: {self.lost!r}"))

    def readable(self) -> bool:
        """Bytes wait in the socket, not yet handed to ``data_received``."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        transport = self.transport
        if transport is None:
            raise StorageError(f"Redis connection lost: {self.lost!r}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        idle = not self.waiters
        self.waiters.append(future)
        if idle and not self._buffer:
            transport.write(packed)  # a lone caller pays no coalescing delay
        else:
            self._buffer.append(packed)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and self._buffer:
            self.transport.write(b"".join(self._buffer))
        self._buffer.clear()


class PipelinedConnection:
    """A single auto-pipelined connection to a standalone Redis (redis://, rediss://, unix://).

    Connects lazily, and again after a loss. ``call`` raises ``StorageError`` on connection
    problems and on ``timeout``; a Redis error reply (e.g. NOSCRIPT) is raised as is.
    """

    def __init__(self, url: str, timeout: float) -> None:
        options = parse_url(url)
        self.host: str = options.get("host", "127.0.0.1")
        self.port: int = int(options.get("port", 6379))
        self.path: str | None = options.get("path")
        self.db = int(options.get("db", 0) or 0)
        self.username: str | None = options.get("username")
        self.password: str | None = options.get("password")
        self.tls = url.startswith("rediss")
        cert_reqs = cast(dict[str, Any], options).get("ssl_cert_reqs")
        if self.tls and cert_reqs not in (None, "required", "none"):
            raise ConfigError(f"ssl_cert_reqs must be required or none, got {cert_reqs!r}")
        self._verify = cert_reqs != "none"
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def call(self, packed: bytes) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            protocol = await self._connect()
        future = protocol.send(packed)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, self._expire, protocol, future, loop.time())
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, protocol: _Protocol, future: asyncio.Future[Any], sent: float) -> None:
        """The timeout fired: fail the call, unless its reply is already waiting to be read.

        A busy event loop (CPU starvation, a long callback) runs this timer late, and uvloop
        runs timers before it polls sockets: the reply may have been in the socket for a while.
        That is the loop's lag, not Redis's: look again once the loop has read the socket
        (bounded, so a stream of other replies cannot keep a lost one waiting for ever).
        """
        if future.done():
            return
        loop = asyncio.get_running_loop()
        if protocol.readable() and loop.time() - sent < max(1.0, 10 * self.timeout):
            # Look again in a millisecond; if the reply came meanwhile, that look is a no-op.
            loop.call_later(0.001, self._expire, protocol, future, sent)
            return
        future.set_exception(
            StorageError(f"Redis did not answer within {self.timeout * 1000:.0f} ms")
        )

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.transport is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(max(self.timeout * 10, 1.0)):
                    if self.path:
                        _, protocol = await loop.create_unix_connection(_Protocol, self.path)
                    else:
                        context = None
                        if self.tls:
                            context = ssl.create_default_context()
                            if not self._verify:
                                context.check_hostname = False
                                context.verify_mode = ssl.CERT_NONE
                        _, protocol = await loop.create_connection(
                            _Protocol, self.host, self.port, ssl=context
                        )
                    handshake = []
                    if self.password:
                        auth = [self.username, self.password] if self.username else [self.password]
                        handshake.append(protocol.send(pack_command(["AUTH", *auth])))
                    if self.db:
                        handshake.append(protocol.send(pack_command(["SELECT", self.db])))
                    for reply in handshake:
                        await reply
            except (OSError, TimeoutError, hiredis.ReplyError) as exc:
                raise StorageError(f"cannot connect to Redis: {exc!r}") from exc
            self._protocol = protocol
            return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

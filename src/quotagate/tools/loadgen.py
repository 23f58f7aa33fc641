"""The load generator under ``quotagate bench``: keep-alive HTTP/1.1 over raw asyncio protocols.

Why not httpx: its per-request cost (a task, a pool lookup, header models) caps one core at a
few thousand requests a second, so the tool, not the server, would be measured. Here every
connection is a callback-driven state machine: the response parser (httptools, llhttp in C, as
uvicorn uses) fires ``on_message_complete``, which records the request and writes the next
pre-rendered request bytes at once, with no coroutine, future or task per request. While
answers keep coming the loop polls rather than sleeps (see ``_Run.active``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from ._common import mask_password as mask_url_text

__all__ = [
    "NO_RESPONSE",
    "ConnectError",
    "LoadResult",
    "Target",
    "parse_target",
    "render_request",
    "run_load",
]

#: Status recorded for a request that got no HTTP response (connection error, timeout).
NO_RESPONSE = 0


class ConnectError(Exception):
    """The target cannot be reached at all (raised before any load is sent)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: parsed once from the URL."""

    scheme: str
    host: str
    port: int
    path: str  # with its query string

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.path}"


def parse_target(url: str) -> Target:
    """Parse an ``http://`` or ``https://`` URL.

    Raises:
        ValueError: with a message fit for a one-line usage error.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL (got {mask_url_text(url)!r})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port, path)


def render_request(
    target: Target, method: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> bytes:
    """One complete HTTP/1.1 request, rendered once and written as is for every send."""
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


@dataclass(slots=True)
class LoadResult:
    """Everything observed, one entry per request in completion order (times in seconds)."""

    started_at: float  # time.time() at start, for the record
    duration: float = 0.0
    starts: list[float] = field(default_factory=list)  # send time, from the run's start
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # NO_RESPONSE for an error
    keys: list[int] = field(default_factory=list)  # index of the request template (the key)
    errors: dict[str, int] = field(default_factory=dict)
    min_remaining: int | None = None  # lowest X-RateLimit-Remaining seen
    retry_after: dict[str, int] = field(default_factory=dict)  # Retry-After value -> count
    ttft: list[float] = field(default_factory=list)  # streams: first token, from send
    stream_tokens: list[int] = field(default_factory=list)
    stream_generation: list[float] = field(default_factory=list)  # first token -> end


class _Run:
    """Shared state of one load run: what to send next, and where results go."""

    def __init__(
        self,
        target: Target,
        requests: Sequence[bytes],
        total: int | None,
        deadline: float | None,
        timeout: float,
        stream: bool,
        on_progress: Callable[[int], None] | None,
        spin: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.requests = list(requests)
        self.total = total
        self.deadline = deadline
        self.timeout = timeout
        self.stream = stream
        self.on_progress = on_progress
        self.ssl = ssl.create_default_context() if target.scheme == "https" else None
        self.sent = 0
        self.completed = 0
        self.t0 = time.perf_counter()
        self.result = LoadResult(started_at=time.time())
        self.connections: set[_Connection] = set()
        self.workers = 0
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.tasks: set[asyncio.Task[None]] = set()
        self.spin = spin
        self.spinning = False
        self.last_activity = 0.0

    def take(self) -> int | None:
        """The index of the next request to send, or None when the run is over."""
        if self.total is not None:
            if self.sent >= self.total:
                return None
        elif self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        index = self.sent
        self.sent += 1
        return index

    def record(self, sent_at: float, now: float, status: int, key: int) -> None:
        result = self.result
        result.starts.append(sent_at - self.t0)
        result.latencies.append(now - sent_at)
        result.statuses.append(status)
        result.keys.append(key)
        self.completed += 1

    def error(self, sent_at: float, kind: str, key: int) -> None:
        self.record(sent_at, time.perf_counter(), NO_RESPONSE, key)
        self.result.errors[kind] = self.result.errors.get(kind, 0) + 1

    def worker_finished(self) -> None:
        self.workers -= 1
        if self.workers == 0 and not self.done.done():
            self.done.set_result(None)

    def spawn(self, first: bool = False) -> None:
        """Start a connection (a worker); ``first`` ones count towards ``workers``."""
        if first:
            self.workers += 1
        task = self.loop.create_task(self._connect_and_go())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect_and_go(self) -> None:
        while True:
            index = self.take()
            if index is None:
                self.worker_finished()
                return
            key = index % len(self.requests)
            sent_at = time.perf_counter()
            try:
                await self.loop.create_connection(
                    functools.partial(_Connection, self, index),
                    self.target.host,
                    self.target.port,
                    ssl=self.ssl,
                    server_hostname=self.target.host if self.ssl else None,
                )
            except OSError as exc:
                self.error(sent_at, type(exc).__name__, key)
                if self.deadline is not None:
                    await asyncio.sleep(0.01)  # no busy spin against a dead server
                continue
            return  # the connection carries on by itself

    def watchdog(self) -> None:
        """Fail requests that exceed the timeout (one timer for all, not one per request)."""
        now = time.perf_counter()
        for connection in list(self.connections):
            if connection.index is not None and now - connection.sent_at > self.timeout:
                connection.fail("Timeout")
        if not self.done.done():
            self.loop.call_later(min(0.25, self.timeout / 4), self.watchdog)

    def active(self) -> None:
        """Data arrived: keep the loop polling instead of sleeping, for ``spin`` seconds.

        At low concurrency every round trip otherwise ends in ``epoll_wait`` going to sleep and
        a wake-up on the next answer, and that wake-up (worse on a busy or virtualised core)
        costs more than the request itself. Go's scheduler, under hey, spins before it parks for
        the same reason. Spinning stops by itself once answers stop coming (slow streams), so
        an idle run costs no CPU.
        """
        self.last_activity = time.perf_counter()
        if not self.spinning and self.spin > 0:
            self.spinning = True
            self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        if not self.done.done() and time.perf_counter() - self.last_activity < self.spin:
            self.loop.call_soon(self._spin)  # a ready callback makes the next poll non-blocking
        else:
            self.spinning = False

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.completed)
        if not self.done.done():
            self.loop.call_later(0.1, self.progress)


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends request after request until the run is over."""

    def __init__(self, run: _Run, first_index: int) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.index: int | None = first_index
        self.sent_at = 0.0
        self.remaining: bytes | None = None
        self.retry_after: bytes | None = None
        self.status = 0
        # Streams only.
        self.buffer = b""
        self.first_token_at = 0.0
        self.tokens = 0
        self.usage_tokens: int | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they quack alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.run.connections.add(self)
        assert self.index is not None
        self.send(self.index)

    def data_received(self, data: bytes) -> None:
        self.run.active()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(type(exc).__name__)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.connections.discard(self)
        if self.index is not None:
            self.fail(type(exc).__name__ if exc else "ConnectionClosed")

    # -- the request cycle ---------------------------------------------------------------------

    def send(self, index: int) -> None:
        self.index = index
        self.remaining = self.retry_after = None
        if self.run.stream:
            self.buffer, self.first_token_at, self.tokens, self.usage_tokens = b"", 0.0, 0, None
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.run.requests[index % len(self.run.requests)])

    def fail(self, kind: str) -> None:
        """The request in flight got no response: record it, and go on on a new connection."""
        index, self.index = self.index, None
        if index is None:
            return
        self.run.error(self.sent_at, kind, index % len(self.run.requests))
        if self.transport is not None:
            self.transport.abort()
        self.run.connections.discard(self)
        self.run.spawn()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 21 and name.lower() == b"x-ratelimit-remaining":
            self.remaining = value
        elif len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.run.stream:
            self._sse(body)

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        index = self.index
        if index is None:
            return
        self.index = None
        run = self.run
        key = index % len(run.requests)
        run.record(self.sent_at, now, self.status, key)
        result = run.result
        if self.remaining is not None:
            with contextlib.suppress(ValueError):
                remaining = int(self.remaining)
                if result.min_remaining is None or remaining < result.min_remaining:
                    result.min_remaining = remaining
        if self.retry_after is not None:
            value = self.retry_after.decode("latin-1").strip()
            result.retry_after[value] = result.retry_after.get(value, 0) + 1
        if run.stream and self.first_token_at:
            if self.buffer.strip():
                self._event(self.buffer)
            tokens = self.usage_tokens if self.usage_tokens is not None else self.tokens
            result.ttft.append(self.first_token_at - self.sent_at)
            result.stream_tokens.append(tokens)
            result.stream_generation.append(now - self.first_token_at)
        if not self.parser.should_keep_alive():
            assert self.transport is not None
            self.transport.close()
            run.connections.discard(self)
            run.spawn()
            return
        following = run.take()
        if following is None:
            assert self.transport is not None
            self.transport.close()
            run.connections.discard(self)
            run.worker_finished()
        else:
            self.send(following)

    # -- server-sent events --------------------------------------------------------------------

    def _sse(self, body: bytes) -> None:
        self.buffer += body.replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        data = b"".join(
            line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = choice.get("text")
            if text is None and isinstance(delta, dict):
                text = delta.get("content")
            if isinstance(text, str) and text:
                self.tokens += 1
                if not self.first_token_at:
                    self.first_token_at = time.perf_counter()


async def probe(target: Target, connect_timeout: float) -> None:
    """Open and close one connection.

    Raises:
        ConnectError: the target is unreachable (refused, no such host, timeout).
    """
    context = ssl.create_default_context() if target.scheme == "https" else None
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(
                target.host,
                target.port,
                ssl=context,
                server_hostname=target.host if context else None,
            ),
            connect_timeout,
        )
    except (OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to {target.url}: {detail}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def run_load(
    target: Target,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    request_timeout: float = 20.0,
    stream: bool = False,
    on_progress: Callable[[int], None] | None = None,
    spin: float = 0.002,
) -> LoadResult:
    """Send ``total`` requests (or keep going for ``duration`` seconds) on ``concurrency``
    keep-alive connections, request ``i`` being ``requests[i % len(requests)]``.

    Requests in flight when the duration ends are completed and counted, so the counts match
    what the server saw. ``spin``: seconds to keep polling after the last data arrived.

    Raises:
        ConnectError: the target is unreachable before any load is sent.
    """
    if (total is None) == (duration is None):
        raise ValueError("give exactly one of total or duration")
    await probe(target, min(request_timeout, 10.0))
    deadline = time.perf_counter() + duration if duration is not None else None
    run = _Run(target, requests, total, deadline, request_timeout, stream, on_progress, spin)
    workers = concurrency if total is None else min(concurrency, total)
    if workers == 0:
        return run.result
    for _ in range(workers):
        run.spawn(first=True)
    run.watchdog()
    run.progress()
    try:
        await run.done
    finally:
        for connection in list(run.connections):
            if connection.transport is not None:
                connection.transport.abort()
        for task in list(run.tasks):
            task.cancel()
    run.result.duration = time.perf_counter() - run.t0
    if on_progress is not None:
        on_progress(run.completed)
    return run.result

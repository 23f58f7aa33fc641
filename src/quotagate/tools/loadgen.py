"""The load generator under ``quotagate bench``: keep-alive HTTP/1.1 over raw asyncio protocols.

Why not httpx: its per-request cost (a task, a pool lookup, header models) caps one core at a
few thousand requests a second, so the tool, not the server, would be measured. Here every
connection is a callback-driven state machine (``_load_connection``): the response parser
(httptools, llhttp in C, as uvicorn uses) fires ``on_message_complete``, which records the
request and writes the next pre-rendered request bytes at once, with no coroutine, future or
task per request. This module runs the load: the target, the rendered requests, who sends next,
the timeout watchdog, and while answers keep coming the loop polls rather than sleeps (see
``_Run.active``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ._common import mask_password as mask_url_text
from ._load_connection import NO_RESPONSE, Connection, LoadResult

__all__ = [
    "NO_RESPONSE",
    "ConnectError",
    "LoadResult",
    "Target",
    "parse_target",
    "render_request",
    "run_load",
]


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
        self.connections: set[Connection] = set()
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
                    functools.partial(Connection, self, index),
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

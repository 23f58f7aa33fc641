"""One connection of a ``loadgen`` run: the HTTP/1.1 client side, request after request.

This is the per-request path of the load generator, kept apart from the run it serves
(``loadgen``: who sends next, the deadline, the timeout watchdog, the spin). A ``Connection``
is an ``asyncio.Protocol`` that httptools' response parser calls back: ``on_header`` keeps the
two rate-limit headers the summary reports, ``on_body`` counts the tokens of a stream's
server-sent events, and ``on_message_complete`` records the answer into the run's
``LoadResult`` and writes the next pre-rendered request at once (no coroutine, future or task
per request: ``loadgen``'s docstring says why). The connection knows its run only
through the ``Run`` protocol, so this module imports nothing from ``loadgen``; the result record
it fills lives here for the same reason, and ``loadgen`` hands it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol, cast

import httptools

__all__ = ["NO_RESPONSE", "Connection", "LoadResult", "Run"]

#: Status recorded for a request that got no HTTP response (connection error, timeout).
NO_RESPONSE = 0


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


class Run(Protocol):
    """What a connection needs of the run it serves (``loadgen``'s)."""

    requests: list[bytes]  # request i is requests[i % len(requests)]
    stream: bool
    result: LoadResult
    connections: set[Connection]  # open, for the watchdog and the final abort

    def take(self) -> int | None:
        """The index of the next request to send, or None when the run is over."""

    def record(self, sent_at: float, now: float, status: int, key: int) -> None: ...

    def error(self, sent_at: float, kind: str, key: int) -> None: ...

    def spawn(self, first: bool = False) -> None:
        """Start a new connection in place of one that closed or failed."""

    def worker_finished(self) -> None: ...

    def active(self) -> None:
        """Data arrived."""


class Connection(asyncio.Protocol):
    """One keep-alive connection that sends request after request until the run is over."""

    def __init__(self, run: Run, first_index: int) -> None:
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

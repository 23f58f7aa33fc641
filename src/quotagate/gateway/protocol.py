"""uvicorn's httptools protocol with a bound on the request head and on the time to send it.

Size: uvicorn puts no limit on header size, and its httptools parser keeps a header value
whole until it ends: 16 MB of header cost the gateway 12 MB of memory before the 400. Here
every read after a request began that leaves its head unfinished is counted; past
``max_header_bytes`` the client gets a 431 with a JSON error and the connection is closed, so
a head never holds more than the bound plus one read. Body bytes are never counted.

Time: uvicorn has no deadline for receiving a request. Its keep-alive timer is cancelled by
any byte, and a new connection has none, so a client sending half a request and nothing more
(or a byte now and then) holds its connection, and its file descriptor, for ever; a thousand
such clients exhaust the default descriptor limit and nobody else gets in. Here a connection
waiting for a request (new, or after a response) must deliver the whole of it, head and body,
within ``request_timeout_s``: otherwise a 408 with a JSON error (or, when it sent nothing,
just the close) and the connection is closed. An app still waiting for that body reads a
disconnect, as if the client had gone.
"""

from __future__ import annotations

import json
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import ErrorFormat
from .responses import error_body

__all__ = ["BoundedHttpToolsProtocol"]

_TOO_LARGE = "The request's header block is larger than this server accepts."
_TIMEOUT = "The request was not received in full within {:g} seconds."


def _body(fmt: ErrorFormat, status: int, code: str, message: str) -> bytes:
    return json.dumps(error_body(fmt, status, code, message)).encode()


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn answers 'a 400',
    which ``send_400_response`` turns into the 431."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing request heads over ``max_header_bytes`` with a 431, and
    requests not received in full within ``request_timeout_s`` with a 408."""

    def __init__(
        self,
        *args: Any,
        max_header_bytes: int = 32768,
        request_timeout_s: float = 30.0,
        error_format: ErrorFormat = "tutorial",  # the library's; the gateway passes its own
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.request_timeout_s = request_timeout_s
        self._431 = _body(error_format, 431, "headers_too_large", _TOO_LARGE)
        self._408 = _body(error_format, 408, "request_timeout", _TIMEOUT.format(request_timeout_s))
        self._deadline: TimerHandle | None = None  # fires at or before _deadline_at
        self._deadline_at: float | None = None  # loop time the request must be in by
        self._begun = self._answered = 0  # requests begun / answered on this connection
        self._whole = True  # the last request begun was received whole
        self._in_head = False  # a request has begun and its head is not complete yet
        self._read_bytes = 0  # bytes of the reads that left the head unfinished
        self._head_size = 0  # request line and headers parsed so far
        self._too_large = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline_at = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._whole = True
        if self._begun == self._answered:  # answered before its body ended: wait for the next
            self._arm_deadline()
        else:
            self._disarm_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._answered += 1
        super().on_response_complete()
        # Waiting for the next request, unless a pipelined one already came in whole.
        if not self.transport.is_closing() and not (self._begun > self._answered and self._whole):
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        # One timer per connection, moved lazily: arming and disarming are two attribute
        # writes per request (a timer handle made and cancelled each time cost 2 us).
        self._deadline_at = self.loop.time() + self.request_timeout_s
        if self._deadline is None:
            self._deadline = self.loop.call_at(self._deadline_at, self._request_timed_out)

    def _disarm_deadline(self) -> None:
        self._deadline_at = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        at = self._deadline_at
        if at is None:
            return
        if self.loop.time() < at:  # armed again since: wait for the new deadline
            self._deadline = self.loop.call_at(at, self._request_timed_out)
            return
        self._deadline_at = None
        outstanding = self._begun - self._answered
        if self.transport.is_closing() or outstanding > 1:
            return  # an earlier response is still being written; its end re-arms the deadline
        if outstanding == 0:
            self.transport.close()  # nothing of a request was sent: close, as keep-alive does
            return
        if not self._in_head:  # the head arrived: this request's cycle waits for the body
            cycle = self.cycle
            if cycle is None or cycle.response_started:
                return  # answered without its body: the response's end re-arms the deadline
            cycle.disconnected = True  # the app reads a disconnect, as if the client had gone
            cycle.message_event.set()
        body = self._408
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._read_bytes += len(data)
            if self._read_bytes > self.max_header_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        self._begun += 1
        self._whole = False
        self._in_head = True
        self._read_bytes = self._head_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size > self.max_header_bytes:  # it came in few reads: too large all the same
            self._too_large = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse()
            return
        super().send_400_response(msg)

    def _refuse(self) -> None:
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy:  # no response of an earlier pipelined request is being written
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(self._431), self._431)
            )
        self.transport.close()

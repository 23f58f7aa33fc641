"""uvicorn's httptools protocol with a bound on the request head.

uvicorn puts no limit on header size, and its httptools parser keeps a header value whole
until it ends: 16 MB of header cost the gateway 12 MB of memory before the 400. Here every
read after a request began that leaves its head unfinished is counted; past
``max_header_bytes`` the client gets a 431 with a JSON error and the connection is closed, so
a head never holds more than the bound plus one read. Body bytes are never counted.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpToolsProtocol"]

_431 = json.dumps(
    {
        "error": "headers_too_large",
        "message": "The request's header block is larger than this server accepts.",
    }
).encode()


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn answers 'a 400',
    which ``send_400_response`` turns into the 431."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing request heads over ``max_header_bytes`` with a 431."""

    def __init__(self, *args: Any, max_header_bytes: int = 32768, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self._in_head = False  # a request has begun and its head is not complete yet
        self._read_bytes = 0  # bytes of the reads that left the head unfinished
        self._head_size = 0  # request line and headers parsed so far
        self._too_large = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._read_bytes += len(data)
            if self._read_bytes > self.max_header_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
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
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_431), _431)
            )
        self.transport.close()

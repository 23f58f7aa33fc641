"""The gateway's own answers: its JSON error shape, and what an upstream failure becomes.

Every error the gateway makes has a precise status and, by default, OpenAI's shape:
``{"error": {"message", "type", "code", "param", ...}}``, which OpenAI's SDKs (and LangChain,
LlamaIndex, ...) read into their exceptions; ``code`` is the gateway's error string and the
extra fields (``retry_after``, ``limit``) sit beside it. ``[server] error_format = "tutorial"``
gives the seed tutorial's flat ``{"error": <code>, "message": ..., ...}`` instead.

A model server's own 4xx passes through as it was sent; a model server that is down, slow or
broken becomes 502/504 before a stream starts, or an error event in OpenAI's shape once it has
(an SSE event is always in OpenAI's shape: that is what stream readers parse).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi.responses import Response

from .._asgi import RawResponse
from ..decision import Decision
from ..http import Headers, rejection_parts
from .backends import UpstreamError, UpstreamRejected
from .config import ErrorFormat

__all__ = ["JSON_TYPE", "Errors", "error_body", "error_type", "stream_error_event"]

logger = logging.getLogger("quotagate")

JSON_TYPE = (b"content-type", b"application/json")

_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def error_type(status: int, code: str, limit: str | None = None) -> str:
    """OpenAI's ``type``: what kind of failure, as its own API names them (a 429 names the
    kind of limit that was hit, ``tokens`` or ``requests``, as OpenAI's do; a concurrency
    limit counts requests)."""
    if status >= 500:
        return "server_error"
    if status == 429 and limit == "budget":
        return "insufficient_quota"  # as OpenAI names a spent quota of money
    if status == 429 and code != "request_too_large":
        return "tokens" if limit == "tokens" else "requests"
    return "invalid_request_error"


def error_body(
    fmt: ErrorFormat, status: int, code: str, message: str, **extra: Any
) -> dict[str, Any]:
    """The body of an error in the configured shape (``param`` is the request field at fault)."""
    if fmt == "tutorial":
        return {"error": code, "message": message, **extra}
    param = extra.pop("param", None)
    kind = error_type(status, code, extra.get("limit"))
    return {"error": {"message": message, "type": kind, "code": code, "param": param, **extra}}


class Errors:
    """The error answers of one gateway, in its ``error_format``."""

    __slots__ = ("format",)

    def __init__(self, fmt: ErrorFormat = "openai") -> None:
        self.format: ErrorFormat = fmt

    def response(
        self,
        status: int,
        code: str,
        message: str,
        headers: Headers | None = None,
        **extra: Any,
    ) -> Response:
        payload = json.dumps(error_body(self.format, status, code, message, **extra)).encode()
        return RawResponse(
            status,
            [*(headers or ()), JSON_TYPE, (b"content-length", b"%d" % len(payload))],
            payload,
        )

    def rejection(
        self, decision: Decision, headers: Iterable[tuple[bytes, bytes]] = (), **extra: Any
    ) -> Response:
        """A request the engine rejected (``quotagate.http.rejection_parts``), with
        ``headers`` added to the rate-limit headers."""
        status, base, flat = rejection_parts(decision, extra)
        code, message = flat.pop("error"), flat.pop("message")
        return self.response(status, code, message, [*base, *headers], **flat)

    def http(self, status: int, detail: str, method: str, path: str) -> Response:
        """404, 405 and the like from routing, in the gateway's shape (not FastAPI's detail)."""
        code = _HTTP_ERRORS.get(status, "http_error")
        return self.response(status, code, f"{detail}: {method} {path}")

    def upstream(self, exc: UpstreamError | UpstreamRejected, headers: Headers) -> Response:
        """A failure before the answer started: the model server's refusal as it was, or
        502/504."""
        if isinstance(exc, UpstreamRejected):
            response = Response(exc.body, status_code=exc.status, media_type=exc.content_type)
            response.raw_headers.extend(headers)
            return response
        logger.warning("quotagate: %s", exc.message)
        return self.response(exc.status, exc.error, exc.message, headers)


def stream_error_event(exc: UpstreamError) -> bytes:
    """A failure after a stream started (the status is sent): an SSE event in OpenAI's shape."""
    logger.warning("quotagate: model server failed mid-stream: %s", exc.message)
    payload = error_body("openai", exc.status, exc.error, exc.message)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"

"""The gateway's own answers: its JSON error shape, and what an upstream failure becomes.

Every error the gateway makes is ``{"error": <code>, "message": <sentence>, ...}`` with a
precise status; a model server's own 4xx passes through as it was sent; a model server that is
down, slow or broken becomes 502/504 with the gateway's shape, before a stream starts, or an
error event in OpenAI's nested shape once it has.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import JSONResponse, Response

from ..http import Headers
from .backends import UpstreamError, UpstreamRejected

__all__ = ["JSON_TYPE", "error", "http_error", "stream_error_event", "upstream_response"]

logger = logging.getLogger("quotagate")

JSON_TYPE = (b"content-type", b"application/json")

_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def error(
    status: int, code: str, message: str, headers: Headers | None = None, **extra: Any
) -> Response:
    """The gateway's error: ``{"error": code, "message": message, **extra}``."""
    response = JSONResponse({"error": code, "message": message, **extra}, status_code=status)
    if headers:
        response.raw_headers.extend(headers)
    return response


def http_error(status: int, detail: str, method: str, path: str) -> Response:
    """404, 405 and the like from routing, in the gateway's shape (not FastAPI's detail)."""
    return error(status, _HTTP_ERRORS.get(status, "http_error"), f"{detail}: {method} {path}")


def upstream_response(exc: UpstreamError | UpstreamRejected, headers: Headers) -> Response:
    """A failure before the answer started: the model server's refusal as it was, or 502/504."""
    if isinstance(exc, UpstreamRejected):
        response = Response(exc.body, status_code=exc.status, media_type=exc.content_type)
        response.raw_headers.extend(headers)
        return response
    logger.warning("quotagate: %s", exc.message)
    return error(exc.status, exc.error, exc.message, headers)


def stream_error_event(exc: UpstreamError) -> bytes:
    """A failure after a stream started (the status is sent): an SSE event in OpenAI's shape."""
    logger.warning("quotagate: model server failed mid-stream: %s", exc.message)
    payload = {"error": {"message": exc.message, "type": exc.error, "code": exc.status}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"

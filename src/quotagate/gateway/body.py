"""The bounded JSON body read: never more than ``max_body_bytes`` held, and a precise 400/413.

A declared ``Content-Length`` over the limit is refused before a byte is read; a body that
grows past it is refused as soon as it does. JSON is parsed strictly (RFC 8259: no ``NaN``),
must be a UTF-8 object, and must not carry lone surrogates that no upstream could take.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from .responses import Errors

__all__ = ["read_json"]


def _reject_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259); Python's parser would take them."""
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one, not one per request


async def read_json(
    scope: Scope, receive: Receive, limit: int, errors: Errors
) -> tuple[dict[str, Any], bytes] | Response:
    """The body as a JSON object and its bytes, or the error answer.

    Raises:
        ClientDisconnect: the client went away before sending all of it.
    """
    too_large = f"The request body exceeds {limit} bytes."
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                return errors.response(413, "body_too_large", too_large)
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # stop reading: never hold more than the limit in memory
            return errors.response(413, "body_too_large", too_large)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        text = raw.decode("utf-8")
        body = _DECODER.decode(text)
        if "\\u" in text:
            # JSON may escape lone surrogates that no UTF-8 can carry on to the upstream.
            json.dumps(body, ensure_ascii=False).encode()
    except UnicodeDecodeError as exc:
        return errors.response(400, "invalid_json", f"The body is not UTF-8: {exc}")
    except (ValueError, RecursionError) as exc:
        return errors.response(400, "invalid_json", f"The body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return errors.response(400, "invalid_json", "The body must be a JSON object.")
    return body, raw

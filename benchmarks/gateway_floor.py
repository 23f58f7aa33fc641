"""The floor of any proxy on quotagate's stack, for ``benchmarks/gateway.py``'s ``floor`` column.

uvicorn (httptools, uvloop) serving one bare ASGI app that reads the request body, sends it to
the model server on the gateway's own HTTP/1.1 pool and answers with what came back (status,
content type, body; a stream chunk by chunk): no identity, no JSON parsing, no limits, no
headers, no metrics. Whatever the gateway spends above this is quotagate's own work; what this
spends is the price of being a Python proxy at all.

Run by the benchmark as ``python -m uvicorn gateway_floor:app`` with ``GATEWAY_FLOOR_UPSTREAM``
set to the model server's ``/v1`` URL.
"""

from __future__ import annotations

import os
from typing import Any

from quotagate.gateway.backends.http1 import Http1Pool

UPSTREAM = os.environ.get("GATEWAY_FLOOR_UPSTREAM", "http://127.0.0.1:9000/v1")
_PATHS = {"/v1/completions": "/completions", "/v1/chat/completions": "/chat/completions"}
_pool: Http1Pool | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _pool = Http1Pool(UPSTREAM, max_connections=128)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _pool is not None:
                    await _pool.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert _pool is not None
    path = _PATHS.get(scope["path"])
    if path is None:  # readiness: GET /health
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    response = await _pool.request("POST", path, b"".join(chunks))
    headers = [(b"content-type", response.header(b"content-type").encode())]
    if b"stream" not in chunks[0]:  # the benchmark's bodies: a stream says "stream": true
        body = await response.read()
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        async for chunk in response.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        response.close()
    await send({"type": "http.response.body", "body": b""})

"""The apps served by ``benchmarks/http.py``: one inference endpoint, limited three ways.

Served as ``uvicorn http_apps:app --app-dir benchmarks`` with the variant chosen by environment:

- ``HTTP_BENCH_LIBRARY``: ``bare`` (no limiting), ``bare-headers`` (no limiting, five fixed
  rate-limit header fields), ``inline`` (one GCRA limit written into the endpoint by hand: the
  floor of any limiter on this stack), ``slowapi`` (the seed tutorial's code) or
  ``quotagate`` (the same app on quotagate).
- ``HTTP_BENCH_STORAGE``: ``memory://`` or ``redis://127.0.0.1:PORT/0``.
- ``HTTP_BENCH_RATE``: the limit of ``POST /v1/completions`` (same for both libraries).

The handler body is the same in every variant; only the limiting around it differs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

LIBRARY = os.environ.get("HTTP_BENCH_LIBRARY", "bare")
STORAGE_URL = os.environ.get("HTTP_BENCH_STORAGE", "memory://")
RATE = os.environ.get("HTTP_BENCH_RATE", "1000000/minute")


def completion() -> dict[str, Any]:
    """The handler body shared by every variant."""
    return {
        "id": "cmpl-bench",
        "object": "text_completion",
        "model": "bench",
        "choices": [{"index": 0, "text": "hello world", "finish_reason": "stop"}],
    }


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> dict[str, Any]:
        return completion()

    return app


#: The five header fields quotagate adds to every limited response, with fixed values.
RATE_LIMIT_HEADERS = [
    (b"x-ratelimit-limit", b"1000000"),
    (b"x-ratelimit-remaining", b"999999"),
    (b"x-ratelimit-reset", b"1"),
    (b"ratelimit-policy", b'"1000000-per-minute";q=1000000;w=60'),
    (b"ratelimit", b'"1000000-per-minute";r=999999;t=1'),
]


def bare_headers_app() -> FastAPI:
    """The bare app sending those five header fields, fixed, without limiting: what the header
    lines alone cost FastAPI and uvicorn (uvicorn checks each name and value with a regex)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(response: Response) -> dict[str, Any]:
        response.raw_headers.extend(RATE_LIMIT_HEADERS)  # merged into the answer by FastAPI
        return completion()

    return app


def inline_app() -> FastAPI:
    """A limiter with nothing around it: GCRA on the ``X-API-Key`` header in a dict, inside
    the endpoint, and the five header fields with their real values through FastAPI's
    sub-response. No library does less per request; what a library costs beyond it is its
    generality (key functions, several limits, storages, the middleware). Its 429 is bare:
    the benchmarks never reach the limit."""
    capacity = _rate_amount()
    interval = 60_000_000 // capacity  # microseconds per request at a "N/minute" rate
    name = b'"%d-per-minute"' % capacity
    policy = name + b";q=%d;w=60" % capacity
    states: dict[bytes, int] = {}
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request, response: Response) -> dict[str, Any]:
        key = b""
        for field, value in request.scope["headers"]:
            if field == b"x-api-key":
                key = value
                break
        now = time.time_ns() // 1000
        tat = max(states.get(key, now), now) + interval
        if tat - now > capacity * interval:
            return JSONResponse({"error": "rate_limit_exceeded"}, status_code=429)
        states[key] = tat
        remaining = (capacity * interval - (tat - now)) // interval
        reset = b"%d" % -(-(tat - now) // 1_000_000)
        response.raw_headers.extend(
            [
                (b"x-ratelimit-limit", b"%d" % capacity),
                (b"x-ratelimit-remaining", b"%d" % remaining),
                (b"x-ratelimit-reset", reset),
                (b"ratelimit-policy", policy),
                (b"ratelimit", name + b";r=%d;t=%s" % (remaining, reset)),
            ]
        )
        return completion()

    return app


def _rate_amount() -> int:
    amount, _, period = RATE.partition("/")
    if period != "minute":
        raise SystemExit(f"the inline variant takes N/minute rates, got {RATE!r}")
    return int(amount)


def slowapi_app() -> FastAPI:
    """The seed tutorial's slowapi code (``headers_enabled`` needs ``request`` and ``response``)."""
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    def api_key_or_ip(request: Request) -> str:
        return request.headers.get("X-API-Key", get_remote_address(request))

    limiter = Limiter(key_func=api_key_or_ip, storage_uri=STORAGE_URL, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.post("/v1/completions")
    @limiter.limit(RATE)
    async def completions(request: Request, response: Response) -> dict[str, Any]:
        return completion()

    return app


def quotagate_app() -> FastAPI:
    """The same app on quotagate: a change of imports, no ``request``/``response`` needed."""
    from quotagate.fastapi import Limiter
    from quotagate.identity import api_key_or_ip

    limiter = Limiter(key_func=api_key_or_ip, storage_uri=STORAGE_URL)
    app = FastAPI()
    limiter.init_app(app)

    @app.post("/v1/completions")
    @limiter.limit(RATE)
    async def completions() -> dict[str, Any]:
        return completion()

    return app


_FACTORIES = {
    "bare": bare_app,
    "bare-headers": bare_headers_app,
    "inline": inline_app,
    "slowapi": slowapi_app,
    "quotagate": quotagate_app,
}
if LIBRARY not in _FACTORIES:
    raise SystemExit(f"HTTP_BENCH_LIBRARY must be one of {sorted(_FACTORIES)}, got {LIBRARY!r}")

app = _FACTORIES[LIBRARY]()

"""The one place that renders rate-limit headers and rejection bodies from a Decision.

Headers (every response of a limited route):
- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``: the most restrictive limit; Reset is
  whole seconds until it is full again.
- ``RateLimit-Policy`` and ``RateLimit`` in the syntax of draft-ietf-httpapi-ratelimit-headers-11
  (structured-field lists, one item per limit): ``"60-per-minute";q=60;w=60`` and
  ``"60-per-minute";r=59;t=1``.
- ``Retry-After`` (whole seconds, at least 1, rounded up) on a 429 or 503 that has one.

Bodies are the seed tutorial's JSON: ``{"error": "rate_limit_exceeded", "message": "Too many
requests. Try again in N seconds.", "retry_after": N}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .decision import Decision, LimitState
from .rates import Rate

__all__ = [
    "Headers",
    "policy_name",
    "rate_limit_headers",
    "rejection",
    "rejection_parts",
    "retry_after_seconds",
]

Headers = list[tuple[bytes, bytes]]


def policy_name(rate: Rate) -> str:
    """``60/minute`` -> ``60-per-minute``; ``100/5 minutes`` -> ``100-per-5-minutes``."""
    return rate.policy


def _policy_item(state: LimitState) -> bytes:
    rate = state.rate
    if rate is None:
        return b'"%d-concurrent";q=%d' % (state.limit, state.limit)
    return rate.policy_bytes


def _state_item(state: LimitState) -> bytes:
    rate = state.rate
    prefix = rate.state_prefix if rate is not None else b'"%d-concurrent";r=' % state.limit
    return b"%s%d;t=%d" % (prefix, state.remaining, math.ceil(state.reset_after))


def retry_after_seconds(seconds: float) -> int:
    """Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 0


def rate_limit_headers(decision: Decision) -> Headers:
    """The headers every response of a limited route carries."""
    headers: Headers = [
        (b"x-ratelimit-limit", b"%d" % decision.limit),
        (b"x-ratelimit-remaining", b"%d" % decision.remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(decision.reset_after)),
    ]
    if states := decision.states:
        headers.append((b"ratelimit-policy", b", ".join(map(_policy_item, states))))
        headers.append((b"ratelimit", b", ".join(map(_state_item, states))))
    return headers


def rejection(
    decision: Decision, extra: Mapping[str, Any] | None = None
) -> tuple[int, Headers, bytes]:
    """Status, headers (content type and length included) and JSON body for a request the
    decision rejected; ``rejection_parts`` says what they hold."""
    status, headers, body = rejection_parts(decision, extra)
    payload = json.dumps(body).encode()
    headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(payload)).encode()))
    return status, headers, payload


def rejection_parts(
    decision: Decision, extra: Mapping[str, Any] | None = None
) -> tuple[int, Headers, dict[str, Any]]:
    """Status, rate-limit headers and body (unencoded) for a request the decision rejected.

    ``limited`` -> 429 with Retry-After and the seed's body; ``too_large`` -> 429
    ``request_too_large`` without Retry-After (waiting cannot help); ``unavailable`` (storage
    down, fallback ``deny``) -> 503 with Retry-After. ``extra`` fields are added to the body.
    """
    headers = rate_limit_headers(decision)
    if decision.reason == "too_large":
        state = next((s for s in decision.states if math.isinf(s.retry_after)), None)
        what = f"the whole {_limit_words(state)} limit" if state else "a whole limit"
        body: dict[str, Any] = {
            "error": "request_too_large",
            "message": f"This request costs more than {what}: it can never pass. Make it smaller.",
        }
        status = 429
    else:
        seconds = retry_after_seconds(decision.retry_after)
        headers.append((b"retry-after", str(seconds).encode()))
        if decision.reason == "unavailable":
            status = 503
            body = {
                "error": "rate_limiter_unavailable",
                "message": f"Rate limiting is unavailable. Try again in {seconds} seconds.",
                "retry_after": seconds,
            }
        else:
            status = 429
            body = {
                "error": "rate_limit_exceeded",
                "message": f"Too many requests. Try again in {seconds} seconds.",
                "retry_after": seconds,
            }
    if extra:
        body.update(extra)
    return status, headers, body


def _limit_words(state: LimitState) -> str:
    return str(state.rate) if state.rate is not None else "concurrency"

"""The one place that renders rate-limit headers and rejection bodies from a Decision.

Headers (every response of a limited route):
- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``: the most restrictive limit; Reset is
  whole seconds until it is full again.
- ``RateLimit-Policy`` and ``RateLimit`` in the syntax of draft-ietf-httpapi-ratelimit-headers-11
  (structured-field lists, one item per limit): ``"60-per-minute";q=60;w=60`` and
  ``"60-per-minute";r=59;t=1``.
- ``Retry-After`` (whole seconds, at least 1, rounded up) on a 429 or 503 that has one.
- OpenAI's own fields for the gateway: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
  (reset as ``6m0s``) and ``retry-after-ms``, which the official SDKs read to pace retries.

Bodies are the seed tutorial's JSON: ``{"error": "rate_limit_exceeded", "message": "Too many
requests. Try again in N seconds.", "retry_after": N}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .decision import Decision, LimitState, most_restrictive
from .keys import family

__all__ = [
    "EXPOSED_HEADERS",
    "NO_RETRY",
    "Headers",
    "format_duration",
    "openai_headers",
    "rate_limit_headers",
    "rejected_limit",
    "rejection",
    "rejection_parts",
    "retry_after_ms",
    "retry_after_seconds",
]

Headers = list[tuple[bytes, bytes]]

_OPENAI_NAMES = {
    group: (
        f"x-ratelimit-limit-{group}".encode(),
        f"x-ratelimit-remaining-{group}".encode(),
        f"x-ratelimit-reset-{group}".encode(),
    )
    for group in ("requests", "tokens")
}

#: On an answer that waiting cannot change (a request too large for its limit, an unknown key,
#: a model nobody serves): the ``openai`` SDKs obey it and do not retry.
NO_RETRY = (b"x-should-retry", b"false")

#: The response headers of the rate-limit contract: what CORS lets a page's code read.
EXPOSED_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
    "retry-after",
    "retry-after-ms",
    *(name.decode() for names in _OPENAI_NAMES.values() for name in names),
)


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
    ``request_too_large`` without Retry-After and with ``x-should-retry: false`` (waiting
    cannot help); ``unavailable`` (storage
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
        headers.append(NO_RETRY)
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


def rejected_limit(decision: Decision) -> str:
    """What the limit a rejection names counts: ``requests``, ``tokens`` or ``concurrency``
    (the decision's own pick, by the name its hit carried)."""
    return family(decision.name)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1h0m0s"``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def openai_headers(decision: Decision) -> Headers:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` as OpenAI sends them: per
    group, the most restrictive of its rate limits (a model's limits count with the tier's)."""
    requests: list[LimitState] = []
    tokens: list[LimitState] = []
    for state in decision.states:
        if state.rate is not None:
            (tokens if family(state.name) == "tokens" else requests).append(state)
    headers: Headers = []
    for group, states in (("requests", requests), ("tokens", tokens)):
        if not states:
            continue
        pick = states[0] if len(states) == 1 else most_restrictive(states)
        assert pick is not None
        limit, remaining, reset = _OPENAI_NAMES[group]
        headers += [
            (limit, b"%d" % pick.limit),
            (remaining, b"%d" % pick.remaining),
            (reset, format_duration(pick.reset_after).encode()),
        ]
    return headers


def retry_after_ms(decision: Decision) -> Headers:
    """``retry-after-ms`` for a rejection that waiting can fix (none for ``too_large``)."""
    if decision.reason == "too_large":
        return []
    return [(b"retry-after-ms", str(math.ceil(decision.retry_after * 1000)).encode())]

from __future__ import annotations

import json
import math

import quotagate as qg
from quotagate.http import rate_limit_headers, rejection, retry_after_seconds


def _state(
    rate: str, remaining: int, reset_after: float, retry_after: float = 0.0
) -> qg.LimitState:
    parsed = qg.parse_rate(rate)
    return qg.LimitState("k", parsed, parsed.amount, remaining, reset_after, retry_after)


def _decision(
    *states: qg.LimitState, reason: qg.Reason = "allowed", retry_after: float = 0.0
) -> qg.Decision:
    first = states[0]
    return qg.Decision(
        reason == "allowed",
        reason,
        retry_after,
        first.limit,
        first.remaining,
        first.reset_after,
        states,
    )


def test_headers_of_an_admission() -> None:
    decision = _decision(_state("60/minute", 59, 1.0), _state("1000/day", 999, 86.4))
    assert dict(rate_limit_headers(decision)) == {
        b"x-ratelimit-limit": b"60",
        b"x-ratelimit-remaining": b"59",
        b"x-ratelimit-reset": b"1",
        b"ratelimit-policy": b'"60-per-minute";q=60;w=60, "1000-per-day";q=1000;w=86400',
        b"ratelimit": b'"60-per-minute";r=59;t=1, "1000-per-day";r=999;t=87',
    }


def test_policy_names() -> None:
    assert qg.parse_rate("60/minute").policy == "60-per-minute"
    assert qg.parse_rate("100/5 minutes").policy == "100-per-5-minutes"


def test_retry_after_is_whole_seconds_rounded_up_at_least_one() -> None:
    assert retry_after_seconds(0.2) == 1
    assert retry_after_seconds(5.01) == 6
    assert retry_after_seconds(6.0) == 6


def test_429_body_is_the_seed_tutorials() -> None:
    decision = _decision(_state("10/minute", 0, 60.0, 29.3), reason="limited", retry_after=29.3)
    status, headers, body = rejection(decision)
    assert status == 429
    assert dict(headers)[b"retry-after"] == b"30"
    assert json.loads(body) == {
        "error": "rate_limit_exceeded",
        "message": "Too many requests. Try again in 30 seconds.",
        "retry_after": 30,
    }


def test_too_large_says_it_can_never_pass_without_retry_after() -> None:
    decision = _decision(
        _state("1000/minute", 1000, 0.0, math.inf), reason="too_large", retry_after=math.inf
    )
    status, headers, body = rejection(decision)
    assert status == 429
    assert b"retry-after" not in dict(headers)
    payload = json.loads(body)
    assert payload["error"] == "request_too_large"
    assert "1000/minute" in payload["message"]


def test_storage_unavailable_is_503() -> None:
    decision = _decision(_state("10/minute", 0, 0.0, 2.0), reason="unavailable", retry_after=2.0)
    status, headers, body = rejection(decision)
    assert status == 503
    assert dict(headers)[b"retry-after"] == b"2"
    assert json.loads(body)["error"] == "rate_limiter_unavailable"


def test_extra_fields_join_the_body() -> None:
    decision = _decision(_state("10/minute", 0, 60.0, 6.0), reason="limited", retry_after=6.0)
    assert json.loads(rejection(decision, {"limit": "requests"})[2])["limit"] == "requests"

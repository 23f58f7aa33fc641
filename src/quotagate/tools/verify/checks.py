"""The checks read from the burst: rate-limit headers on the 200s, the (N+1)th request's 429
and its body, and the 429's Retry-After. Each takes what the burst showed and returns its
``Check``; the checks that send requests of their own are in ``probes``."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from .evidence import Check, Exchange
from .limits import LimitUnderTest, remaining

__all__ = ["check_headers", "check_limit_429", "check_retry_after", "ordinal"]

#: The contract's headers on every successful response of a limited route.
REQUIRED_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``61st``, ``111th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def check_headers(
    admitted: list[Exchange],
    configured: LimitUnderTest | None,
    from_headers: LimitUnderTest | None,
    refills: int,
) -> Check:
    """Every 200 carries the contract's headers as integers, and remaining goes down (by at
    most ``refills`` rises); the gateway's request limit is the config's."""
    title = "rate-limit headers on successful responses"
    problems: list[str] = []
    missing: dict[str, int] = {}
    for exchange in admitted:
        for name in REQUIRED_HEADERS:
            if name not in exchange.headers:
                missing[name] = missing.get(name, 0) + 1
    if missing:
        names = ", ".join(
            f"{name} (missing on {n} of {len(admitted)})" for name, n in missing.items()
        )
        problems.append(f"headers absent from 200 responses: {names}")
    for exchange in admitted:
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
            value = exchange.headers.get(name)
            if value is not None and not (value.isdigit()):
                problems.append(f"{name} is not a non-negative integer (got {value!r})")
                break
        limit_value = exchange.int_header("x-ratelimit-limit")
        left = exchange.int_header("x-ratelimit-remaining")
        if limit_value is not None and left is not None and left > limit_value:
            problems.append(f"x-ratelimit-remaining {left} > x-ratelimit-limit {limit_value}")
    series = [r for r in (remaining(e) for e in admitted) if r is not None]
    if len(series) >= 2:
        rises = sum(1 for a, b in itertools.pairwise(series) if b > a)
        if series[-1] > series[0] - (len(series) - 1) + refills or rises > refills:
            problems.append(
                f"remaining does not go down as requests are admitted: {series[:12]}"
                + ("…" if len(series) > 12 else "")
                + " (headers not updating)"
            )
    if (
        configured is not None
        and from_headers is not None
        and configured.limit != from_headers.limit
    ):
        problems.append(
            f"the gateway reports a request limit of {from_headers.limit}, the config says "
            f"{configured.limit} ({configured.text}): is it running this config?"
        )
    notes = []
    if admitted:
        head = admitted[0]
        shown = ", ".join(
            f"{name}: {head.headers[name]}"
            for name in (*REQUIRED_HEADERS[:4], "x-ratelimit-limit-requests")
            if name in head.headers
        )
        notes.append(f"first 200: {shown or 'no rate-limit headers'}")
        if series:
            notes.append(
                f"remaining (requests) over {len(admitted)} admitted: {series[0]} -> {series[-1]}"
            )
    else:
        problems.append("no successful response to look at")
    return Check(
        "headers",
        title,
        not problems,
        "; ".join(problems)
        or "every 200 carries X-RateLimit-* and RateLimit fields, and remaining goes down",
        admitted,
        notes,
    )


def check_limit_429(
    burst: list[Exchange],
    expected: int | None,
    refills: int,
    seconds: float,
    limit: LimitUnderTest | None,
) -> Check:
    """The burst ends in a 429 at request ``expected + 1`` (or up to ``refills`` later), with
    the tutorial's exact body."""
    position = len(burst) if burst[-1].status != 200 else None
    nth = ordinal(expected + 1) if expected is not None else "(N+1)th"
    title = f"the {nth} rapid request is 429 with the exact JSON body"
    notes = [
        f"{sum(e.status == 200 for e in burst)} requests -> 200 in {seconds:.2f} s"
        + (
            f" ({refills} refills possible at one per {limit.interval:g} s)"
            if limit and limit.interval and refills
            else ""
        )
    ]
    if limit is not None and limit.source.startswith("the 429"):
        notes.append(f"limit {limit.text} read from {limit.source}")
    problems: list[str] = []
    last = burst[-1]
    if position is None:
        problems.append(
            f"no 429 after {len(burst)} rapid requests"
            + (f" (expected one at request {expected + 1})" if expected is not None else "")
            + ": the limit is not enforced for this key (shadow mode? a key function that "
            "gives every request its own client?)"
        )
    else:
        notes.append(f"request {position}: {last.line()}")
        if last.status != 429:
            problems.append(f"request {position} answered {last.status}, not 429")
        elif expected is None:
            problems.append(
                f"429 at request {position}, but the limit to expect is unknown: no --config "
                "and no rate-limit headers to read it from"
            )
        elif not expected + 1 <= position <= expected + 1 + refills:
            problems.append(
                f"429 at request {position}, expected at request {expected + 1}: the key "
                "was charged more than once per request, or shares its counter"
            )
        if last.status == 429:
            problems += _body_problems(last)
    return Check(
        "limit_429",
        title,
        not problems,
        "; ".join(problems)
        or f"request {position} is 429 with the tutorial's body"
        + (
            " in OpenAI's error shape"
            if isinstance(last.body, dict) and isinstance(last.body.get("error"), dict)
            else ""
        ),
        burst,
        notes,
    )


def rejection_fields(body: Any) -> dict[str, Any]:
    """A 429 body's fields in the tutorial's flat shape, whichever shape the gateway uses:
    OpenAI's ``{"error": {"message", "type", "code", "param", ...}}`` (its default) is read as
    ``{"error": code, "message", ...}``, without ``type`` and ``param``."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return body if isinstance(body, dict) else {}
    error = body["error"]
    extra = {k: v for k, v in error.items() if k not in ("message", "type", "code", "param")}
    outside = {k: v for k, v in body.items() if k != "error"}
    return {"error": error.get("code"), "message": error.get("message"), **extra, **outside}


def _body_problems(exchange: Exchange) -> list[str]:
    """How a 429 differs from the tutorial's body (plus the gateway's optional ``limit``), in
    the tutorial's flat shape or in OpenAI's."""
    body = exchange.body
    if not isinstance(body, dict):
        return [f"the 429 body is not a JSON object (got {body!r})"]
    problems = []
    nested = isinstance(body.get("error"), dict)
    if nested:
        missing = [k for k in ("message", "type", "code", "param") if k not in body["error"]]
        if missing or len(body) != 1:
            problems.append(
                f"the 429 body is not OpenAI's error shape: got {json.dumps(body)}, expected "
                '{"error": {"message", "type", "code", "param", ...}}'
            )
    fields = rejection_fields(body)
    seconds = fields.get("retry_after")
    expected = {
        "error": "rate_limit_exceeded",
        "message": f"Too many requests. Try again in {seconds} seconds.",
        "retry_after": seconds,
    }
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        problems.append(f"retry_after is not an integer (got {seconds!r})")
    core = {k: v for k, v in fields.items() if k != "limit"}
    if core != expected:
        shape = " (in OpenAI's shape)" if nested else ""
        problems.append(
            f"the 429 body{shape} differs from the tutorial's: got {json.dumps(core)}, "
            f"expected {json.dumps(expected)}"
        )
    body = fields
    if "limit" in body and body["limit"] != "requests":
        problems.append(f'the 429 names limit {body["limit"]!r}, not "requests"')
    content_type = exchange.header("content-type") or ""
    if not content_type.startswith("application/json"):
        problems.append(f"the 429 Content-Type is {content_type!r}, not application/json")
    return problems


def check_retry_after(rejected: Exchange | None, limit: LimitUnderTest | None) -> Check:
    """The 429's Retry-After is whole seconds >= 1, within one refill interval of the limit,
    and agrees with the body's ``retry_after`` and ``retry-after-ms``."""
    title = "Retry-After present and sensible"
    problems: list[str] = []
    notes: list[str] = []
    if rejected is None or rejected.status != 429:
        problems.append("no 429 to read Retry-After from")
    else:
        value = rejected.header("retry-after")
        body = rejection_fields(rejected.body)
        bound = math.ceil(limit.interval) if limit and limit.interval else None
        notes.append(
            f"Retry-After: {value} · body retry_after: {body.get('retry_after')} · "
            f"retry-after-ms: {rejected.header('retry-after-ms')}"
            + (
                f" · {limit.text} frees one request every {limit.interval:g} s"
                if limit and limit.interval
                else ""
            )
        )
        if value is None:
            problems.append("no Retry-After header on the 429")
        elif not value.isdigit() or int(value) < 1:
            problems.append(f"Retry-After is not whole seconds >= 1 (got {value!r})")
        else:
            seconds = int(value)
            if bound is not None and seconds > bound:
                problems.append(
                    f"Retry-After {seconds} s is longer than the {bound} s after which the "
                    f"limit ({limit.text if limit else '?'}) admits another request"
                )
            if body.get("retry_after") != seconds:
                problems.append(
                    f"body retry_after {body.get('retry_after')!r} differs from "
                    f"Retry-After {seconds}"
                )
            millis = rejected.header("retry-after-ms")
            if millis is not None and (
                not millis.isdigit() or math.ceil(int(millis) / 1000) != seconds
            ):
                problems.append(f"retry-after-ms {millis} disagrees with Retry-After {seconds}")
    return Check(
        "retry_after",
        title,
        not problems,
        "; ".join(problems) or "whole seconds, within one refill interval, and the body agrees",
        [rejected] if rejected else [],
        notes,
    )

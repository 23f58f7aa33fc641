"""The run: the smallest complete path (one completion, then a rapid burst as key 1 until its
429), then each check in turn, every verdict printed as it is reached."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from .._common import ToolError
from .checks import check_headers, check_limit_429, check_retry_after, ordinal
from .evidence import Check, Client, Exchange
from .limits import LimitUnderTest, configured_limit, limit_from_headers, remaining
from .probes import (
    Complete,
    check_health_not_limited,
    check_independent_keys,
    check_restart_resets,
)
from .setup import COMPLETIONS, GatewayUnderTest, KeyInfo

__all__ = ["run_checks"]

#: Upper bound on requests when the limit cannot be known in advance (no config, no headers).
PROBE_CAP = 1000


def run_checks(
    gateway: GatewayUnderTest,
    environment: dict[str, Any],
    *,
    restart: bool,
    echo: Callable[[str], None],
) -> list[Check]:
    """Run every check against ``gateway`` and print each verdict as it is reached.

    Adds the limit under test to ``environment`` (the record's starting state, which names the
    model to request and the health limit).

    Raises:
        ToolError: key 1 is refused or already limited, or the gateway cannot be reached.
    """
    client = gateway.client
    first_key, second_key = gateway.keys
    complete = _completions(client, environment["model"])
    first = _first_completion(complete, first_key)

    configured = configured_limit(gateway.config, first_key.tier)
    from_headers = limit_from_headers(first, "the first response's headers")
    limit = configured or from_headers
    if limit is not None and limit.tier is None:
        limit = dataclasses.replace(limit, tier=first_key.tier)
    environment["limit"] = limit.to_json() if limit else None
    left = remaining(first)
    if left is None and limit is not None and limit.limit is not None:
        left = limit.limit - 1  # no headers: assume an unused key, as when started here
    expected = None if left is None else 1 + left  # 200s before the 429
    if limit is not None:
        echo(
            f"  {'limit':<10} {limit.text} requests for tier {limit.tier or 'unknown'} "
            f"(from {limit.source})"
            + (
                f": {expected} rapid requests pass, the {ordinal(expected + 1)} is 429"
                if expected is not None
                else ""
            )
        )
    else:
        echo(f"  {'limit':<10} unknown: no --config and no rate-limit headers")
    if environment["health_limit"]:
        echo(f"  {'health':<10} {environment['health_limit']} per client")
    echo("")

    burst = _burst(complete, first_key, first, expected, limit, client.started)
    burst_seconds = burst[-1].at + burst[-1].elapsed_ms / 1000 - first.at
    rejected = burst[-1] if burst[-1].status != 200 else None
    interval = limit.interval if limit else None
    if expected is None and rejected is not None:
        # No config and no headers on the 200s: a 429 still has to say what limit it hit.
        limit = limit_from_headers(rejected, "the 429's headers (none on the 200s)")
        if limit is not None:
            limit = dataclasses.replace(limit, tier=first_key.tier)
            environment["limit"] = limit.to_json()
            expected = limit.limit  # an unused key, as it had to be
            interval = limit.interval
    refills = math.floor(burst_seconds / interval) if interval else 0
    admitted = [e for e in burst if e.status == 200]

    checks: list[Check] = []

    def report(check: Check) -> None:
        checks.append(check)
        echo(f"{'PASS' if check.passed else 'FAIL'}  {check.title}")
        if not check.passed:
            echo(f"      reason: {check.reason}")
        for note in check.notes:
            echo(f"      {note}")
        echo("")

    report(check_headers(admitted, configured, from_headers, refills))
    report(check_limit_429(burst, expected, refills, burst_seconds, limit))
    report(check_retry_after(rejected, limit))
    report(
        check_independent_keys(
            complete,
            first_key,
            second_key,
            rejected,
            second_limit=configured_limit(gateway.config, second_key.tier),
            fresh=gateway.process is not None,  # a gateway started here: key 2 is unused
        )
    )
    report(check_health_not_limited(client, first_key, limit, len(admitted)))
    if restart:
        assert gateway.process is not None  # the command refuses --restart with --url
        assert gateway.config is not None
        report(
            check_restart_resets(
                complete,
                first_key,
                limit,
                rejected,
                process=gateway.process,
                config=gateway.config,
            )
        )
    elif gateway.process is not None:
        echo("note: counters after a restart were not checked (add --restart)")
    else:
        echo("note: counters after a restart are checked only on a gateway verify starts")
    return checks


def _completions(client: Client, model: str) -> Complete:
    body = {"model": model, "prompt": "hi", "max_tokens": 1}

    def complete(info: KeyInfo) -> Exchange:
        return client.call("POST", COMPLETIONS, info.secret, body)

    return complete


def _first_completion(complete: Complete, key: KeyInfo) -> Exchange:
    """The smallest complete path: one completion as ``key``, which must be a 200."""
    first = complete(key)
    if first.status in (401, 403):
        raise ToolError(f"key {key.masked} was refused: {first.status} {first.body}")
    if first.status == 429:
        raise ToolError(
            f"key {key.masked} is over its limit already (Retry-After "
            f"{first.header('retry-after')} s): wait, or verify with an unused key"
        )
    if first.status != 200:
        raise ToolError(f"POST {COMPLETIONS} answered {first.status}: {first.body}")
    return first


def _burst(
    complete: Complete,
    key: KeyInfo,
    first: Exchange,
    expected: int | None,
    limit: LimitUnderTest | None,
    started: float,
) -> list[Exchange]:
    """Rapid completions as ``key`` after ``first`` until one is not a 200, or until the one
    that had to be 429 (allowing for the refills the elapsed time gives) was sent and was not."""
    burst = [first]
    interval = limit.interval if limit else None
    cap = PROBE_CAP if expected is None else 2 * expected + 100
    while burst[-1].status == 200 and len(burst) < cap:
        if expected is not None:
            elapsed = time.perf_counter() - started - first.at
            allowance = math.floor(elapsed / interval) if interval else 0
            if len(burst) >= expected + 1 + allowance:
                break  # the request that had to be 429 was sent, and was not
        burst.append(complete(key))
    return burst

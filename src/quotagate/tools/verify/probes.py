"""The checks that send requests of their own once key 1 is limited: key 2 counted apart, /health
not limited at the inference threshold, and counters that reset (``--restart``). Each returns
its ``Check``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .._gateway import GatewayProcess
from .evidence import Check, Client, Exchange
from .limits import LimitUnderTest, remaining
from .setup import HEALTH, KeyInfo, redis_storage, reset_prefix

if TYPE_CHECKING:
    from ...gateway.config import GatewayConfig

__all__ = [
    "Complete",
    "check_health_not_limited",
    "check_independent_keys",
    "check_restart_resets",
]

#: One completion as ``key``: the request the burst is made of.
Complete = Callable[[KeyInfo], Exchange]


def check_independent_keys(
    complete: Complete,
    first_key: KeyInfo,
    second_key: KeyInfo,
    rejected: Exchange | None,
    *,
    second_limit: LimitUnderTest | None,
    fresh: bool,
) -> Check:
    """Right after key 1's 429, key 2 is admitted; on a ``fresh`` gateway (started by verify,
    key 2 unused) with its own full count, ``second_limit`` - 1 left."""
    title = "the two keys are counted independently"
    second = complete(second_key)
    again = complete(first_key)
    problems: list[str] = []
    notes = [f"key 2: {second.line()}", f"key 1 again: {again.line()}"]
    if rejected is None or rejected.status != 429:
        problems.append(f"key 1 ({first_key.masked}) was never limited, so nothing to compare")
    elif second.status == 429:
        problems.append(
            f"key 2 ({second_key.masked}) got 429 right after key 1 ({first_key.masked}) used "
            "up its limit: the gateway counts both keys as one client (its key function "
            "must use the API key, not a constant or the IP)"
        )
    elif second.status != 200:
        problems.append(f"key 2 ({second_key.masked}) answered {second.status}, not 200")
    else:
        left = remaining(second)
        if (
            fresh
            and second_limit
            and second_limit.limit
            and left is not None
            and left != second_limit.limit - 1
        ):
            problems.append(
                f"key 2's first request left {left} of {second_limit.limit}, not "
                f"{second_limit.limit - 1}: its counter is shared with key 1's"
            )
    return Check(
        "independent_keys",
        title,
        not problems,
        "; ".join(problems) or "key 2 was admitted while key 1 was limited",
        [second, again],
        notes,
    )


def check_health_not_limited(
    client: Client, key: KeyInfo, limit: LimitUnderTest | None, admitted: int
) -> Check:
    """N + 1 ``GET /health`` as key 1 (over its inference limit of N, or ``admitted`` when the
    limit is unknown) all answer 200, and the health limit, when sent, is above N."""
    threshold = limit.limit if limit and limit.limit else admitted
    count = threshold + 1
    title = f"/health is not limited at the inference threshold ({count} requests pass)"
    exchanges: list[Exchange] = []
    for _ in range(count):
        exchanges.append(client.call("GET", HEALTH, key.secret))
        if exchanges[-1].status != 200:
            break
    problems: list[str] = []
    last = exchanges[-1]
    notes = [
        f"{sum(e.status == 200 for e in exchanges)} x GET {HEALTH} [{key.masked}] -> 200 "
        f"(key 1 is over its inference limit)",
        f"last: {last.line()}",
    ]
    if last.status != 200:
        problems.append(
            f"GET {HEALTH} answered {last.status} at request {len(exchanges)} of {count}: "
            "health is limited at or below the inference threshold, or shares its counter"
        )
    health_limit = last.int_header("x-ratelimit-limit")
    if health_limit is not None and health_limit <= threshold:
        problems.append(
            f"/health's limit ({health_limit}) is not above the inference limit ({threshold})"
        )
    return Check(
        "health_not_limited",
        title,
        not problems,
        "; ".join(problems) or f"{count} health requests passed",
        exchanges,
        notes,
    )


def check_restart_resets(
    complete: Complete,
    key: KeyInfo,
    limit: LimitUnderTest | None,
    rejected: Exchange | None,
    *,
    process: GatewayProcess,
    config: GatewayConfig,
) -> Check:
    """Restart the gateway verify started: on memory storage key 1 starts over; on Redis it is
    still limited (Redis keeps counters) until the counters under the configured prefix are
    reset (nothing else in the database is touched), then it starts over.

    Raises:
        ToolError: the counters in Redis could not be reset.
    """
    redis = redis_storage(config)
    title = (
        "counters reset after a reset of the prefix (Redis keeps them across a restart)"
        if redis is not None
        else "counters reset after a restart (memory storage)"
    )
    problems: list[str] = []
    notes: list[str] = []
    exchanges: list[Exchange] = []
    if rejected is None or rejected.status != 429:
        problems.append("key 1 was never limited, so there is nothing to reset")
    limit_value = limit.limit if limit else None
    process.restart()
    notes.append(f"restarted the gateway (pid {process.pid})")
    if redis is not None:
        after_restart = complete(key)
        exchanges.append(after_restart)
        notes.append(f"after the restart: {after_restart.line()}")
        left = remaining(after_restart)
        since = after_restart.at - (rejected.at if rejected else 0.0)
        full_again = limit is not None and limit.window is not None and since >= limit.window
        kept = after_restart.status == 429 or (
            left is not None and limit_value is not None and left < limit_value - 1
        )
        if not kept and not full_again:
            problems.append(
                "counters did not survive the restart: the gateway is not keeping them in "
                "Redis (fallback mode?)"
            )
        notes.append(reset_prefix(redis, config.storage.url))
    after = complete(key)
    exchanges.append(after)
    notes.append(f"then: {after.line()}")
    left = remaining(after)
    if after.status != 200:
        problems.append(f"key 1 still answered {after.status} after the reset")
    elif limit_value is not None and left is not None and left != limit_value - 1:
        problems.append(f"key 1 has {left} of {limit_value} left, not {limit_value - 1}")
    return Check(
        "restart_resets",
        title,
        not problems,
        "; ".join(problems) or "key 1 starts over with a full limit",
        exchanges,
        notes,
    )

"""One table of cases, checked against the pure Python algorithms and the Redis Lua script.

Each row: algorithm, capacity, interval (µs), stored state (None = no state), now (µs), cost ->
expected verdict, remaining, reset_after (µs), retry_after (µs).
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from quotagate.algorithms import fixed_window, gcra
from quotagate.algorithms.gcra import rescaled
from quotagate.storage import FIXED_WINDOW, GCRA
from quotagate.storage.redis import RedisStorage
from support import RedisServer

NOW = 1_800_000_000_000_000
S = 1_000_000  # one second in µs

# GCRA, 10/minute: interval 6 s, tolerance 60 s.
GCRA_CASES = [
    ("fresh bucket", None, 1, (0, 9, 6 * S, 0)),
    ("stale state counts as full", NOW - 100 * S, 1, (0, 9, 6 * S, 0)),
    ("nine used", NOW + 54 * S, 1, (0, 0, 60 * S, 0)),
    ("ten used", NOW + 60 * S, 1, (1, 0, 60 * S, 6 * S)),
    ("in debt", NOW + 120 * S, 1, (1, 0, 120 * S, 66 * S)),
    ("whole bucket at once", None, 10, (0, 0, 60 * S, 0)),
    ("cost above capacity", None, 11, (2, 10, 0, 0)),
    ("zero cost reads", NOW + 12 * S, 0, (0, 8, 12 * S, 0)),
    ("partial wait", NOW + 57 * S, 2, (1, 0, 57 * S, 9 * S)),
]

# Fixed window, 5/minute: window 60 s; NOW sits exactly on a window boundary.
FW_CASES = [
    ("fresh window", None, 1, (0, 4, 60 * S, 0)),
    ("same window", (NOW + 60 * S, 4), 1, (0, 0, 60 * S, 0)),
    ("window full", (NOW + 60 * S, 5), 1, (1, 0, 60 * S, 60 * S)),
    ("old window ignored", (NOW, 5), 1, (0, 4, 60 * S, 0)),
    ("cost above capacity", None, 6, (2, 5, 60 * S, 0)),
]


@pytest.mark.parametrize(
    ("name", "tat", "cost", "expected"), GCRA_CASES, ids=[c[0] for c in GCRA_CASES]
)
def test_gcra_python(name: str, tat: int | None, cost: int, expected: tuple[int, ...]) -> None:
    verdict, _, remaining, reset_after, retry_after = gcra(tat, NOW, 10, 6 * S, cost)
    assert (verdict, remaining, reset_after, retry_after) == expected


@pytest.mark.parametrize(
    ("name", "state", "cost", "expected"), FW_CASES, ids=[c[0] for c in FW_CASES]
)
def test_fixed_window_python(
    name: str, state: tuple[int, int] | None, cost: int, expected: tuple[int, ...]
) -> None:
    end, count = state if state else (None, 0)
    verdict, _, remaining, reset_after, retry_after = fixed_window(end, count, NOW, 5, 60 * S, cost)
    assert (verdict, remaining, reset_after, retry_after) == expected


async def _lua(server: RedisServer, stored: str | None, args: list[int]) -> list[int]:
    storage = RedisStorage(server.url, prefix="cases", timeout=2.0)
    await storage.start()
    raw = aioredis.Redis.from_url(server.url)
    try:
        await raw.delete("cases:{k}:x")
        if stored is not None:
            await raw.set("cases:{k}:x", stored)
        return await storage.decide(["{k}:x"], [1, *args], now_us=NOW)
    finally:
        await raw.aclose()
        await storage.aclose()


@pytest.mark.redis
@pytest.mark.parametrize(
    ("name", "tat", "cost", "expected"), GCRA_CASES, ids=[c[0] for c in GCRA_CASES]
)
async def test_gcra_lua(
    redis_server: RedisServer, name: str, tat: int | None, cost: int, expected: tuple[int, ...]
) -> None:
    stored = None if tat is None else f"{tat} {6 * S}"  # "tat interval": written at 10/minute
    out = await _lua(redis_server, stored, [GCRA, 10, 6 * S, cost])
    assert (out[0], *out[3:6]) == expected


@pytest.mark.redis
@pytest.mark.parametrize(
    ("name", "state", "cost", "expected"), FW_CASES, ids=[c[0] for c in FW_CASES]
)
async def test_fixed_window_lua(
    redis_server: RedisServer,
    name: str,
    state: tuple[int, int] | None,
    cost: int,
    expected: tuple[int, ...],
) -> None:
    stored = None if state is None else f"{state[0]} {state[1]}"
    out = await _lua(redis_server, stored, [FIXED_WINDOW, 5, 60 * S, cost])
    assert (out[0], *out[3:6]) == expected


# A state written at 10/minute (interval 6 s, 10 used: tat = now + 60 s), read after the limit
# changed: the 10 units counted stay counted, at the new interval.
RESCALE_CASES = [
    ("raised to 20/minute: 10 more at once", 20, 3 * S, 1, (0, 9, 33 * S, 0)),
    ("raised to 20/minute: 11 is over", 20, 3 * S, 11, (1, 10, 30 * S, 3 * S)),
    ("lowered to 5/minute: over", 5, 12 * S, 1, (1, 0, 120 * S, 72 * S)),
    ("same rate: as it was", 10, 6 * S, 1, (1, 0, 60 * S, 6 * S)),
]


@pytest.mark.parametrize(
    ("name", "capacity", "interval", "cost", "expected"),
    RESCALE_CASES,
    ids=[c[0] for c in RESCALE_CASES],
)
def test_gcra_rescaled_python(
    name: str, capacity: int, interval: int, cost: int, expected: tuple[int, ...]
) -> None:
    tat = rescaled(NOW + 60 * S, 6 * S, interval, NOW)
    verdict, _, remaining, reset_after, retry_after = gcra(tat, NOW, capacity, interval, cost)
    assert (verdict, remaining, reset_after, retry_after) == expected


@pytest.mark.redis
@pytest.mark.parametrize(
    ("name", "capacity", "interval", "cost", "expected"),
    RESCALE_CASES,
    ids=[c[0] for c in RESCALE_CASES],
)
async def test_gcra_rescaled_lua(
    redis_server: RedisServer,
    name: str,
    capacity: int,
    interval: int,
    cost: int,
    expected: tuple[int, ...],
) -> None:
    out = await _lua(redis_server, f"{NOW + 60 * S} {6 * S}", [GCRA, capacity, interval, cost])
    assert (out[0], *out[3:6]) == expected

"""A fixed window of a calendar period (storage algorithm ``CALENDAR``): memory and the Redis
Lua scripts end it exactly at the UTC boundary, a month on the 1st whatever its length."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

import quotagate as qg
from quotagate.algorithms.calendar import DAY, MONTH, WEEK, YEAR, calendar_bounds
from quotagate.storage import CALENDAR

pytestmark = pytest.mark.asyncio


def at(*parts: int) -> int:
    moment = datetime(*parts, tzinfo=UTC)  # type: ignore[misc]
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


async def spend(storage: qg.Storage, key: str, period: int, cost: int, now: int) -> list[int]:
    """Spend ``cost`` of 5_000_000 in ``period``: [verdict, _, now, remaining, reset, retry]."""
    return await storage.decide([key], [1, CALENDAR, 5_000_000, period, cost], now_us=now)


@pytest.mark.parametrize(
    ("last", "first"),
    [
        ((2026, 1, 31, 23, 59, 59, 999999), (2026, 2, 1)),  # a 31st
        ((2026, 2, 28, 23, 59, 59, 999999), (2026, 3, 1)),  # February
        ((2028, 2, 29, 23, 59, 59, 999999), (2028, 3, 1)),  # a leap day
        ((2026, 12, 31, 23, 59, 59, 999999), (2027, 1, 1)),  # the year's end
    ],
)
async def test_a_month_resets_exactly_at_its_end(
    storage: qg.Storage, key_prefix: str, last: tuple[int, ...], first: tuple[int, ...]
) -> None:
    key = f"{key_prefix}:budget"
    start = at(last[0], last[1], 1)
    assert (await spend(storage, key, MONTH, 4_000_000, start))[0] == 0
    out = await spend(storage, key, MONTH, 2_000_000, at(*last))
    assert out[0] == 1  # 1_000_000 left of 5_000_000: limited
    assert out[3] == 1_000_000
    assert out[4] == out[5] == 1  # resets in one microsecond
    out = await spend(storage, key, MONTH, 2_000_000, at(*first))
    assert out[0] == 0  # a new month: all of it again
    assert out[3] == 3_000_000
    assert out[4] == calendar_bounds(at(*first), MONTH)[1] - at(*first)


async def test_a_day_and_a_week_reset_at_their_boundaries(
    storage: qg.Storage, key_prefix: str
) -> None:
    key = f"{key_prefix}:day"
    assert (await spend(storage, key, DAY, 5_000_000, at(2026, 12, 2, 23, 59, 59)))[0] == 0
    assert (await spend(storage, key, DAY, 1, at(2026, 12, 2, 23, 59, 59, 999999)))[0] == 1
    assert (await spend(storage, key, DAY, 1, at(2026, 12, 3)))[0] == 0
    key = f"{key_prefix}:week"
    out = await spend(storage, key, WEEK, 5_000_000, at(2026, 12, 6, 12))  # a Sunday
    assert out[4] == at(2026, 12, 7) - at(2026, 12, 6, 12)  # until Monday 00:00
    assert (await spend(storage, key, WEEK, 1, at(2026, 12, 7)))[0] == 0


async def test_a_settlement_refunds_and_charges_within_the_period(
    storage: qg.Storage, key_prefix: str
) -> None:
    key = f"{key_prefix}:settle"
    now = at(2026, 2, 10, 8)
    await spend(storage, key, MONTH, 3_000_000, now)  # reserved
    out = await storage.adjust([key], [1, CALENDAR, 5_000_000, MONTH, -2_500_000], now_us=now)
    assert out[1] == 4_500_000  # settled at 500_000: the rest given back
    assert out[2] == at(2026, 3, 1) - now
    out = await storage.adjust([key], [1, CALENDAR, 5_000_000, MONTH, 700_000], now_us=now)
    assert out[1] == 3_800_000
    assert (await spend(storage, key, MONTH, 3_900_000, now))[0] == 1
    # A refund in a later month does not reach back: that month starts at nothing spent.
    later = at(2026, 3, 2)
    out = await storage.adjust([key], [1, CALENDAR, 5_000_000, MONTH, -1_000_000], now_us=later)
    assert out[1] == 5_000_000


async def test_every_period_end_agrees_with_python_on_random_moments(
    storage: qg.Storage, key_prefix: str
) -> None:
    rng = random.Random(16)
    for i in range(200):
        now = rng.randrange(at(1971, 1, 1), at(2200, 1, 1))
        period = (DAY, WEEK, MONTH, YEAR)[i % 4]
        out = await spend(storage, f"{key_prefix}:r{i}", period, 0, now)
        assert out[4] == calendar_bounds(now, period)[1] - now, (now, period)


async def test_a_calendar_limit_through_the_engine_resets_on_the_first_of_the_month(
    storage: qg.Storage, clock: qg.FakeClock
) -> None:
    """``algorithm="calendar"``: "N/month" is a calendar month, not 30 days."""
    limiter = qg.RateLimiter(storage, overlimit_cache=False)
    clock.now = at(2026, 2, 27, 12) / 1_000_000
    spent = await limiter.hit("acme", "50000000/month", cost=49_000_000, algorithm="calendar")
    assert spent.allowed
    assert spent.remaining == 1_000_000
    assert spent.reset_after == pytest.approx(36 * 3600)  # to 1 March 00:00, 2026 has no 29th
    over = await limiter.hit("acme", "50000000/month", cost=2_000_000, algorithm="calendar")
    assert not over.allowed
    assert over.retry_after == pytest.approx(36 * 3600)
    clock.advance(36 * 3600)
    assert (
        await limiter.hit("acme", "50000000/month", cost=2_000_000, algorithm="calendar")
    ).allowed


async def test_a_calendar_limit_needs_a_calendar_period(storage: qg.Storage) -> None:
    limiter = qg.RateLimiter(storage)
    with pytest.raises(qg.ConfigError, match="calendar"):
        await limiter.hit("acme", "5/10 minutes", algorithm="calendar")

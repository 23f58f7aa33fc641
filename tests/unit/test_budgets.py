"""Money in integer micro-dollars, budgets parsed, and calendar periods in UTC that end exactly
at their boundary (a day at 00:00, a month on the 1st whatever its length)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from quotagate.errors import ConfigError
from quotagate.gateway.budgets import (
    Budget,
    Price,
    dollars,
    parse_budgets,
    period_bounds,
    usd,
    usd_text,
    wait_text,
)


def at(*parts: int) -> int:
    """Microseconds since the epoch of a UTC moment."""
    moment = datetime(*parts, tzinfo=UTC)  # type: ignore[misc]
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def test_a_cost_is_exact_integer_micro_dollars_rounded_up() -> None:
    llama = Price.of("0.60", "0.80")
    assert llama == Price(600_000, 800_000)
    assert llama.cost(1000, 200) == 600 + 160  # 1000 x $0.60/M + 200 x $0.80/M
    assert llama.cost(0, 0) == 0
    mock = Price.of(0.10, 0.20)
    assert mock.cost(25, 10) == 5  # 2.5 + 2.0 = 4.5 micro-dollars: never charged less
    assert mock.cost(10, 0) == 1  # 1.0 exactly: not rounded further
    assert sum(mock.cost(1, 0) for _ in range(10)) == 10  # each request rounds once, up


def test_no_float_drift_over_a_million_requests() -> None:
    price = Price.of("0.30", "0.70")
    assert sum(price.cost(1000, 300) for _ in range(1_000_000)) == 510 * 1_000_000


def test_usd_amounts() -> None:
    assert usd("5") == 5_000_000
    assert usd(0.1) == 100_000
    assert usd("0.000001") == 1
    for bad in ("-1", "0.0000001", "five", "nan"):
        with pytest.raises(ConfigError):
            usd(bad)
    assert usd_text(4_981_299) == "4.9812"  # rounded down: never more than there is
    assert usd_text(5_000_000, 2) == "5.00"
    assert usd_text(0) == "0.0000"
    assert [dollars(m) for m in (5_000_000, 500_000, 100, 4_981_234)] == [
        "5.00",
        "0.50",
        "0.0001",
        "4.981234",
    ]


def test_budgets_parse_one_per_period() -> None:
    assert parse_budgets("$5/day; $50/month") == (
        Budget(5_000_000, "day"),
        Budget(50_000_000, "month"),
    )
    assert parse_budgets("$0.50 / days") == (Budget(500_000, "day"),)
    assert str(Budget(5_000_000, "day")) == "$5.00/day"
    assert Budget(5_000_000, "day").adjective == "daily"
    assert str(Budget(50_000_000, "month").rate) == "50000000/month"
    for bad in ("5/day", "$5/fortnight", "$5/day; $6/day", "", "$0/day", "$-1/day"):
        with pytest.raises(ConfigError):
            parse_budgets(bad)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", (2026, 12, 2, 13, 45, 7), (2026, 12, 2), (2026, 12, 3)),
        ("day", (2026, 12, 31, 23, 59, 59, 999999), (2026, 12, 31), (2027, 1, 1)),
        ("day", (2027, 1, 1), (2027, 1, 1), (2027, 1, 2)),  # the boundary is the new day's
        ("month", (2026, 1, 31, 12), (2026, 1, 1), (2026, 2, 1)),  # a 31st
        ("month", (2026, 2, 28, 23, 59, 59), (2026, 2, 1), (2026, 3, 1)),  # February: 28 days
        ("month", (2028, 2, 29, 8), (2028, 2, 1), (2028, 3, 1)),  # a leap year's 29th
        ("month", (2026, 3, 1), (2026, 3, 1), (2026, 4, 1)),
        ("month", (2026, 12, 15), (2026, 12, 1), (2027, 1, 1)),  # the year's end
        ("week", (2026, 12, 2, 9), (2026, 11, 30), (2026, 12, 7)),  # a Wednesday: from Monday
        ("week", (2026, 11, 30), (2026, 11, 30), (2026, 12, 7)),
        ("hour", (2026, 12, 2, 9, 59, 59), (2026, 12, 2, 9), (2026, 12, 2, 10)),
        ("year", (2028, 2, 29), (2028, 1, 1), (2029, 1, 1)),
    ],
)
def test_periods_are_calendar_periods_in_utc(
    period: str, now: tuple[int, ...], start: tuple[int, ...], end: tuple[int, ...]
) -> None:
    assert period_bounds(period, at(*now)) == (at(*start), at(*end))


def test_a_period_ends_exactly_where_the_next_starts() -> None:
    last = at(2026, 2, 28, 23, 59, 59, 999999)
    assert period_bounds("month", last)[1] == last + 1
    assert period_bounds("month", last + 1)[0] == last + 1


def test_waits_in_words() -> None:
    assert wait_text(3 * 3600 + 12 * 60 + 40) == "3 h 12 min"
    assert wait_text(5 * 60) == "5 min"
    assert wait_text(39.2) == "40 s"
    assert wait_text(2 * 86400 + 3 * 3600) == "2 d 3 h"
    assert wait_text(3600) == "1 h"


def test_calendar_periods_agree_with_the_standard_library_for_every_day_of_two_centuries() -> None:
    """The integer arithmetic the Lua scripts share, against ``datetime``, one moment in each
    day from 1970 to 2170 (every month end, February and leap day included)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    day = 86_400_000_000
    for days in range(0, 200 * 366):
        now = days * day + (days * 7919 % 86_400) * 1_000_000  # some moment in the day
        moment = epoch + timedelta(microseconds=now)
        month_start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        month_end = (month_start + timedelta(days=32)).replace(day=1)
        week_start = (moment - timedelta(days=moment.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        year_start = month_start.replace(month=1)
        assert period_bounds("month", now) == (micros(month_start), micros(month_end))
        assert period_bounds("week", now) == (micros(week_start), micros(week_start) + 7 * day)
        assert period_bounds("year", now) == (
            micros(year_start),
            micros(year_start.replace(year=year_start.year + 1)),
        )


def micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

"""Calendar periods in UTC, in integer microseconds since the epoch: an hour, a day (from
00:00), a week (from Monday), a month (from the 1st) and a year (from 1 January).

A fixed window of one of these (``storage`` algorithm ``CALENDAR``) resets exactly at the
period's boundary, whatever its length: a month is 28 to 31 days. The twin of
``calendar_end`` in ``storage/lua/*.lua``: the same integer arithmetic (Howard Hinnant's
``days_from_civil`` and ``civil_from_days``), exact in Lua's doubles.
"""

from __future__ import annotations

__all__ = [
    "CODE_OF_SECONDS",
    "DAY",
    "HOUR",
    "MONTH",
    "PERIOD_CODES",
    "PERIOD_SECONDS",
    "WEEK",
    "YEAR",
    "calendar_bounds",
]

#: Period codes on the wire (the ``interval`` of a ``CALENDAR`` limit).
HOUR, DAY, WEEK, MONTH, YEAR = 1, 2, 3, 4, 5
PERIOD_CODES = {"hour": HOUR, "day": DAY, "week": WEEK, "month": MONTH, "year": YEAR}
#: Each period as a rate's length ("N/month" is 30 days as a length, the calendar's month as
#: a window), and back: a calendar limit's rate names its period by its length.
PERIOD_SECONDS = {"hour": 3600, "day": 86400, "week": 604800, "month": 2592000, "year": 31104000}
CODE_OF_SECONDS = {PERIOD_SECONDS[name]: code for name, code in PERIOD_CODES.items()}

_US_HOUR = 3_600_000_000
_US_DAY = 24 * _US_HOUR
_US_WEEK = 7 * _US_DAY
_MONDAY = 4 * _US_DAY  # 1970-01-05, the first Monday after the epoch


def calendar_bounds(now: int, period: int) -> tuple[int, int]:
    """The start and the end (the next period's start) of the period holding ``now``."""
    if period == HOUR:
        start = now // _US_HOUR * _US_HOUR
        return start, start + _US_HOUR
    if period == DAY:
        start = now // _US_DAY * _US_DAY
        return start, start + _US_DAY
    if period == WEEK:
        start = (now - _MONDAY) // _US_WEEK * _US_WEEK + _MONDAY
        return start, start + _US_WEEK
    year, month, _ = _civil(now // _US_DAY)
    if period == MONTH:
        after = (year + 1, 1) if month == 12 else (year, month + 1)
        return _days(year, month, 1) * _US_DAY, _days(*after, 1) * _US_DAY
    if period == YEAR:
        return _days(year, 1, 1) * _US_DAY, _days(year + 1, 1, 1) * _US_DAY
    raise ValueError(f"unknown calendar period code {period!r}")


def _days(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a date of the proleptic Gregorian calendar."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil(days: int) -> tuple[int, int, int]:
    """The date ``days`` after 1970-01-01: ``(year, month, day)``."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day

"""Money: model prices and spend budgets over calendar periods, in integer micro-dollars.

Prices are USD per million tokens (``[prices."llama-3-70b"] input = 0.60``), kept as integer
micro-dollars per million tokens, so a request's cost is exact integer arithmetic: prompt x
input + completion x output, over a million, rounded UP to a whole micro-dollar (a request is
never charged less than it cost; at most one micro-dollar more). A budget is an amount per
calendar period in UTC: ``"$5/day; $50/month"``. A day starts at 00:00 UTC, a week on Monday,
a month on the 1st, a year on 1 January: a period resets exactly at its boundary, whatever its
length (28 to 31 days for a month).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..algorithms.calendar import PERIOD_CODES, calendar_bounds
from ..errors import ConfigError
from ..rates import Rate

__all__ = [
    "MICROS",
    "PERIODS",
    "Budget",
    "Price",
    "parse_budgets",
    "period_bounds",
    "usd",
    "usd_text",
    "wait_text",
]

#: Micro-dollars in a dollar.
MICROS = 1_000_000
_PER = 1_000_000  # prices are per million tokens
#: A period as a rate's length (the engine maps it to its calendar period: a month is 30 days
#: as a length, the calendar's month as a window).
_PERIOD_SECONDS = {"hour": 3600, "day": 86400, "week": 604800, "month": 2592000, "year": 31104000}

#: The calendar periods a budget may have, and what the message calls each.
PERIODS = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly", "year": "yearly"}

_BUDGET_RE = re.compile(r"^\s*\$\s*(?P<amount>\d+(?:\.\d+)?)\s*/\s*(?P<period>[a-z]+)\s*$", re.I)


def usd(amount: float | int | str | Decimal) -> int:
    """Dollars as whole micro-dollars; more than six decimals, or a negative, is refused."""
    try:
        value = Decimal(str(amount)) * MICROS
    except InvalidOperation:
        raise ConfigError(f"expected an amount of USD like 0.60 (got {amount!r})") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ConfigError(f"expected USD >= 0 with at most 6 decimals (got {amount!r})")
    return int(value)


def usd_text(micros: int, places: int = 4) -> str:
    """Micro-dollars as USD text: ``4981200`` -> ``4.9812`` (rounded down: never more than
    there is)."""
    step = 10 ** (6 - places)
    whole, part = divmod(micros // step, 10**places)
    return f"{whole}.{part:0{places}d}"


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price, in micro-dollars per million tokens (that is, pico-dollars a token)."""

    input: int
    output: int

    @classmethod
    def of(cls, input: float | str | Decimal, output: float | str | Decimal) -> Price:
        """From USD per million tokens."""
        return cls(usd(input), usd(output))

    def cost(self, prompt: int, completion: int) -> int:
        """Micro-dollars for these tokens, rounded up."""
        return -(-(prompt * self.input + completion * self.output) // _PER)


@dataclass(frozen=True, slots=True)
class Budget:
    """``amount`` micro-dollars per calendar ``period`` (a key of ``PERIODS``)."""

    amount: int
    period: str

    def __post_init__(self) -> None:
        if self.period not in PERIODS:
            raise ConfigError(f"budget period must be one of {list(PERIODS)} (got {self.period!r})")
        if self.amount <= 0:
            raise ConfigError(f"a budget must be more than $0 (got {self.amount} micro-dollars)")

    @property
    def adjective(self) -> str:
        return PERIODS[self.period]

    @property
    def rate(self) -> Rate:
        """As the engine counts it: ``amount`` per period, with ``algorithm="calendar"``."""
        return Rate(self.amount, _PERIOD_SECONDS[self.period])

    def __str__(self) -> str:
        return f"${usd_text(self.amount, 2)}/{self.period}"


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"$5/day; $50/month"`` -> one ``Budget`` per period (a period at most once)."""
    budgets: list[Budget] = []
    for part in filter(None, (p.strip() for p in re.split(r"[;,]", text))):
        found = _BUDGET_RE.match(part)
        if found is None:
            raise ConfigError(f'expected "$N/period" like "$5/day; $50/month" (got {part!r})')
        period = found["period"].lower().removesuffix("s")
        budget = Budget(usd(found["amount"]), period)
        if any(b.period == period for b in budgets):
            raise ConfigError(f"one budget per period: {period!r} appears twice in {text!r}")
        budgets.append(budget)
    if not budgets:
        raise ConfigError(f'expected "$N/period" like "$5/day; $50/month" (got {text!r})')
    return tuple(budgets)


def period_bounds(period: str, now_us: int) -> tuple[int, int]:
    """The calendar period (UTC) holding ``now_us`` (microseconds since the epoch): its start
    and its end, both in microseconds; the end is the next period's start."""
    return calendar_bounds(now_us, PERIOD_CODES[period])


def wait_text(seconds: float) -> str:
    """A wait in words, coarse as a person says it: ``3 h 12 min``, ``5 min``, ``40 s``,
    ``2 d 3 h``."""
    whole = max(0, int(-(-seconds // 1)))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"

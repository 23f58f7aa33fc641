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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from ..algorithms.calendar import PERIOD_CODES, PERIOD_SECONDS, calendar_bounds
from ..decision import Decision, LimitState
from ..errors import ConfigError
from ..keys import BUDGET, family
from ..rates import Rate

__all__ = [
    "MICROS",
    "PERIODS",
    "Budget",
    "Price",
    "budget_headers",
    "describe_budgets",
    "dollars",
    "over_budget",
    "parse_budgets",
    "period_bounds",
    "room",
    "split",
    "usd",
    "usd_text",
    "wait_text",
]

#: Micro-dollars in a dollar.
MICROS = 1_000_000
_PER = 1_000_000  # prices are per million tokens

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


def dollars(micros: int) -> str:
    """An amount as a person writes it: ``5.00``, ``0.50``, ``0.0001`` (cents at least, and
    every micro-dollar there is)."""
    text = usd_text(micros, 6).rstrip("0")
    whole, _, part = text.partition(".")
    return f"{whole}.{part:0<2}"


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
        return Rate(self.amount, PERIOD_SECONDS[self.period])

    def __str__(self) -> str:
        return f"${dollars(self.amount)}/{self.period}"


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


def split(decision: Decision) -> tuple[Decision, tuple[LimitState, ...]]:
    """The decision as the rate-limit headers show it (its budgets' micro-dollars left out:
    the most restrictive of the other limits picked again when a budget was), and its budgets'
    states."""
    spent = tuple(s for s in decision.states if s.name == BUDGET)
    if not spent:
        return decision, ()
    others = tuple(s for s in decision.states if s.name != BUDGET)
    if decision.name != BUDGET:  # the pick is another limit's: it stays
        return decision._replace(states=others), spent
    pick = _tightest(s for s in others if s.limit > 0)
    if pick is None:
        shown = decision._replace(states=others, limit=0, remaining=0, reset_after=0.0)
    else:
        shown = decision._replace(
            states=others, limit=pick.limit, remaining=pick.remaining, reset_after=pick.reset_after
        )
    return shown, spent


def _tightest(states: Iterable[LimitState]) -> LimitState | None:
    """The state with the least left of its limit (ties: the longer reset), as the engine
    picks a decision's."""
    return min(states, key=lambda s: (s.remaining / s.limit, -s.reset_after), default=None)


def budget_headers(spent: tuple[LimitState, ...]) -> list[tuple[bytes, bytes]]:
    """``x-quotagate-budget-{limit,remaining,reset}`` of the tightest budget: USD, USD,
    seconds to its period's end."""
    if not spent:
        return []
    tightest = _tightest(spent)
    assert tightest is not None
    return [
        (b"x-quotagate-budget-limit", usd_text(tightest.limit).encode()),
        (b"x-quotagate-budget-remaining", usd_text(tightest.remaining).encode()),
        (b"x-quotagate-budget-reset", b"%d" % -(-tightest.reset_after // 1)),
    ]


def budget_of(state: LimitState, budgets: tuple[Budget, ...]) -> Budget:
    """The tier's budget a state counts."""
    return next((b for b in budgets if b.rate == state.rate), budgets[0])


def over_budget(decision: Decision, budgets: tuple[Budget, ...]) -> dict[str, object]:
    """The error fields of a request a budget refused: ``budget_exceeded`` until the period
    ends, or ``request_too_large`` when its cost bound is more than the whole budget."""
    # The budget that refused: the one it waits longest for (forever: larger than all of it).
    state = max((s for s in decision.states if s.name == BUDGET), key=lambda s: s.retry_after)
    budget = budget_of(state, budgets)
    if decision.reason == "too_large":
        message = (
            f"This request may cost more than the whole ${dollars(budget.amount)} "
            f"{budget.adjective} budget: it can never pass. Ask for fewer tokens (max_tokens)."
        )
        return {"error": "request_too_large", "message": message, "limit": BUDGET}
    message = (
        f"The ${dollars(budget.amount)} {budget.adjective} budget is used up; "
        f"it resets in {wait_text(state.retry_after)}."
    )
    return {"error": "budget_exceeded", "message": message, "limit": BUDGET}


def describe_budgets(
    spent: tuple[LimitState, ...], budgets: tuple[Budget, ...], now: float
) -> list[dict[str, object]]:
    """``/v1/ratelimit``'s view of each budget: its period, USD limit and left, and when the
    period resets (seconds, and the UTC moment)."""
    described: list[dict[str, object]] = []
    for state in spent:
        budget = budget_of(state, budgets)
        resets = datetime.fromtimestamp(round(now + state.reset_after), UTC)
        described.append(
            {
                "period": budget.period,
                "limit_usd": usd_text(state.limit),
                "remaining_usd": usd_text(state.remaining),
                "reset_after": round(state.reset_after, 3),
                "resets_at": resets.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return described


def room(decision: Decision, price: Price | None) -> int | None:
    """The output tokens a request's token limits and budgets still allow after ``decision``
    (what is left of each; a budget's at its model's output price); None when none limits
    them (nothing to hold an answer to)."""
    more: list[int] = []
    for state in decision.states:
        if family(state.name) == "tokens":
            more.append(state.remaining)
        elif state.name == BUDGET and price is not None and price.output > 0:
            more.append(state.remaining * _PER // price.output)
    return min(more, default=None)

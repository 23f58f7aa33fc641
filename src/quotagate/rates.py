"""Rates: ``"60/minute; 1000/day"`` -> ``(Rate(60, 60.0), Rate(1000, 86400.0))``.

Accepted forms: ``60/minute``, ``60 per minute``, ``10/second``, ``100/5 minutes``, ``2/hours``;
units second, minute, hour, day, week, month, year (singular or plural, as ``limits`` and
slowapi take them: a month is 30 days, a year 12 months) and the short forms s, sec, min, h,
hr, d; several separated by ``;`` or ``,``. Parsing is cached: the hot path passes the same
strings again and again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import ConfigError

__all__ = ["Rate", "RateLike", "as_rates", "parse_rate", "parse_rates"]

_MICROS = 1_000_000

_DAY = 86400
_MONTH = 30 * _DAY  # as ``limits`` counts them, so a slowapi "5/month" means the same here
_UNIT_SECONDS: dict[str, int] = {}
# Whole words and a few unambiguous short forms; "m" (minute or month?) is refused.
for _names, _seconds in (
    (("second", "seconds", "s", "sec", "secs"), 1),
    (("minute", "minutes", "min", "mins"), 60),
    (("hour", "hours", "h", "hr", "hrs"), 3600),
    (("day", "days", "d"), _DAY),
    (("week", "weeks"), 7 * _DAY),
    (("month", "months"), _MONTH),
    (("year", "years"), 12 * _MONTH),
):
    for _name in _names:
        _UNIT_SECONDS[_name] = _seconds

# Largest unit first, for rendering a period back to words.
_UNIT_NAMES = (
    ("year", 12 * _MONTH),
    ("month", _MONTH),
    ("week", 7 * _DAY),
    ("day", _DAY),
    ("hour", 3600),
    ("minute", 60),
    ("second", 1),
)

_RATE_RE = re.compile(
    r"^\s*(?P<amount>\d+)\s*(?:/|\bper\b)\s*(?P<multiple>\d+)?\s*(?P<unit>[a-z]+)\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Rate:
    """``amount`` units per ``period`` seconds.

    Under GCRA a full bucket admits ``amount`` at once, then one every ``period / amount``.
    """

    amount: int
    period: float
    #: Length of the period in whole microseconds: the unit of all storage arithmetic, so that
    #: Python and the Redis Lua script compute with exact integers and agree to the microsecond.
    period_us: int = field(init=False, repr=False, compare=False)
    #: GCRA emission interval in microseconds (``period / amount``, at least 1).
    interval_us: int = field(init=False, repr=False, compare=False)
    #: Stable text used in storage keys: the period, e.g. ``60s``. Not the amount: a limit whose
    #: amount changes keeps its state (see ``algorithms.gcra``).
    key_suffix: str = field(init=False, repr=False, compare=False)
    #: Its name in the IETF RateLimit headers, e.g. ``60-per-minute``; its whole
    #: ``RateLimit-Policy`` item, ``"60-per-minute";q=60;w=60``; and the start of its
    #: ``RateLimit`` item, ``"60-per-minute";r=`` (header bytes rendered once, sent often).
    policy: str = field(init=False, repr=False, compare=False)
    policy_bytes: bytes = field(init=False, repr=False, compare=False)
    state_prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 1:
            raise ConfigError(f"rate amount must be a positive integer, got {self.amount!r}")
        if not self.period > 0:
            raise ConfigError(f"rate period must be positive seconds, got {self.period!r}")
        period_us = round(self.period * _MICROS)
        object.__setattr__(self, "period_us", period_us)
        object.__setattr__(self, "interval_us", max(1, round(period_us / self.amount)))
        object.__setattr__(self, "key_suffix", f"{self.period:g}s")
        policy = f"{self.amount}-per-{self.unit_text.replace(' ', '-')}"
        object.__setattr__(self, "policy", policy)
        item = f'"{policy}";q={self.amount};w={math.ceil(self.period)}'
        object.__setattr__(self, "policy_bytes", item.encode())
        object.__setattr__(self, "state_prefix", f'"{policy}";r='.encode())

    @property
    def emission_interval(self) -> float:
        """Seconds between two admissions at a steady pace."""
        return self.period / self.amount

    @property
    def unit(self) -> tuple[float, str]:
        """The period in the largest unit that divides it: ``(5, "minute")``, ``(90,
        "second")``; ``(1.5, "second")`` when none does."""
        for name, seconds in _UNIT_NAMES:
            if self.period % seconds == 0:
                return int(self.period // seconds), name
        return self.period, "second"

    @property
    def unit_text(self) -> str:
        """The period in words: ``minute``, ``5 minutes``, ``90 seconds``."""
        multiple, name = self.unit
        return name if multiple == 1 else f"{multiple:g} {name}s"

    def __str__(self) -> str:
        return f"{self.amount}/{self.unit_text}"


RateLike = str | Rate | Sequence[Rate]


def parse_rate(text: str) -> Rate:
    """Parse one rate such as ``"60/minute"`` or ``"100 per 5 minutes"``.

    Raises:
        ConfigError: the text is not a rate; the message quotes it.
    """
    match = _RATE_RE.match(text)
    if match is None:
        raise ConfigError(f'expected "N/unit" like "60/minute", got {text.strip()!r}')
    unit = match["unit"].lower()
    seconds = _UNIT_SECONDS.get(unit)
    if seconds is None:
        raise ConfigError(
            f"unknown time unit {match['unit']!r} in {text.strip()!r} "
            "(use second, minute, hour, day, week, month or year, or s, min, h, d)"
        )
    multiple = int(match["multiple"]) if match["multiple"] else 1
    amount = int(match["amount"])
    if amount < 1 or multiple < 1:
        raise ConfigError(f"rate must be positive, got {text.strip()!r}")
    return Rate(amount, float(seconds * multiple))


@lru_cache(maxsize=4096)
def parse_rates(text: str) -> tuple[Rate, ...]:
    """Parse ``"60/minute; 1000/day"`` (``;`` or ``,`` between rates) into Rate values.

    Raises:
        ConfigError: any part is not a rate, or the text holds no rate at all.
    """
    if not isinstance(text, str):
        raise ConfigError(f"expected rate text like '60/minute', got {text!r}")
    parts = [part for part in re.split(r"[;,]", text) if part.strip()]
    if not parts:
        raise ConfigError(f'expected "N/unit" like "60/minute", got {text!r}')
    return tuple(parse_rate(part) for part in parts)


def as_rates(rates: RateLike) -> tuple[Rate, ...]:
    """Normalize what the public API accepts (text, one Rate, or a sequence) to a tuple."""
    if isinstance(rates, str):
        return parse_rates(rates)
    if isinstance(rates, Rate):
        return (rates,)
    result = tuple(rates)
    if not result or not all(isinstance(rate, Rate) for rate in result):
        raise ConfigError(f"expected rate text or Rate values, got {rates!r}")
    return result

"""Decision values: what the limiter answered, and the state of each limit it checked.

Immutable named tuples rather than frozen dataclasses: a decision is built for every request,
and here construction is over twice as fast (see benchmarks/decisions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ._types import Reason
from .rates import Rate

__all__ = ["Decision", "Lease", "LimitState"]


class LimitState(NamedTuple):
    """One (key, rate) after a decision; ``rate`` is None for a concurrency limit."""

    key: str
    rate: Rate | None
    limit: int
    remaining: int
    reset_after: float
    """Seconds until this limit is full again."""
    retry_after: float
    """Seconds until this limit alone would admit the request; 0.0 when it does."""
    name: str = ""
    """The limit's name from its ``Hit`` (``requests``, ``tokens``, ...): what to group by."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held concurrency slot; give it back with ``RateLimiter.release``.

    ``expires_at_us`` is in the storage's clock (Redis TIME for Redis), in microseconds: past it the
    slot is free again even if never released, so a crashed holder cannot keep it.
    """

    key: str
    id: str
    expires_at_us: int


class Decision(NamedTuple):
    """The answer to one ``hit`` / ``hit_many``: allowed or not, and why.

    ``limit``, ``remaining`` and ``reset_after`` describe the most restrictive limit: on an
    admission the one with the smallest ``remaining / limit`` (ties: longer ``reset_after``); on a
    rejection the one that forced the longest ``retry_after``.
    """

    allowed: bool
    reason: Reason
    retry_after: float
    limit: int
    remaining: int
    reset_after: float
    states: tuple[LimitState, ...]
    lease: Lease | None = None
    name: str = ""
    """The name of the limit that ``limit`` / ``remaining`` / ``retry_after`` describe: on a
    rejection, the limit the 429 names."""

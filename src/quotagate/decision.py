"""Decision values: what the limiter answered, and the state of each limit it checked.

Immutable named tuples rather than frozen dataclasses: a decision is built for every request,
and here construction is over twice as fast (see benchmarks/decisions.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ._types import Reason
from .rates import Rate

__all__ = ["Decision", "Lease", "LimitState", "combine", "most_restrictive"]


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


def most_restrictive(states: Sequence[LimitState]) -> LimitState | None:
    """Of admitted states, the one the client is closest to exhausting: the smallest
    ``remaining / limit``, ties to the longer ``reset_after`` (the rule ``_decision`` applies
    inline on the hot path)."""
    if not states:
        return None
    return min(states, key=lambda s: (s.remaining / s.limit if s.limit else 0.0, -s.reset_after))


def combine(decisions: Sequence[Decision]) -> Decision:
    """One Decision standing for several taken on the same request (route and default limits).

    Rejected if any was; the most restrictive limit is chosen across all states by the same
    rule as a single decision.
    """
    if len(decisions) == 1:
        return decisions[0]
    states = tuple(s for d in decisions for s in d.states)
    rejected = [d for d in decisions if not d.allowed]
    if rejected:
        worst = max(rejected, key=lambda d: d.retry_after)
        return worst._replace(states=states)
    pick = most_restrictive(states)
    if pick is None:
        return decisions[0]
    lease = next((d.lease for d in decisions if d.lease is not None), None)
    return Decision(
        True, "allowed", 0.0, pick.limit, pick.remaining, pick.reset_after, states, lease, pick.name
    )

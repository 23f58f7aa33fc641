"""GCRA, the generic cell rate algorithm (ITU-T I.371), as a virtual scheduling rule.

State is one number per (client, limit): the theoretical arrival time ``tat``. A rate of
``capacity`` per period has emission interval ``interval`` and tolerance ``capacity * interval``,
so a full bucket (``tat <= now``) admits ``capacity`` units at once, then one per interval.

The storages keep the interval a ``tat`` was written under beside it: when a limit's rate
changes (a reload, a key's new limits), ``rescaled`` reads the units already counted at the new
interval, so a client raised from 10 to 20 a minute after using 10 has 10 more at once, and one
lowered to 5 is over until enough time passes. A limit never starts over because it changed.
"""

from __future__ import annotations

from .verdict import Verdict

_ALLOWED, _LIMITED, _TOO_LARGE = Verdict.ALLOWED, Verdict.LIMITED, Verdict.TOO_LARGE

__all__ = ["GcraResult", "gcra", "gcra_adjust", "rescaled"]

#: ``(verdict, new_tat, remaining, reset_after, retry_after)``; verdict 0 allowed, 1 limited,
#: 2 too large (cost above capacity: can never pass). ``new_tat`` is the state to store when the
#: whole decision admits. A plain tuple: this runs for every limit of every request.
GcraResult = tuple[int, int, int, int, int]


def gcra(tat: int | None, now: int, capacity: int, interval: int, cost: int) -> GcraResult:
    """Decide one GCRA limit; all times in microseconds.

    Args:
        tat: stored theoretical arrival time, or None when the bucket is full (no state).
        now: current time.
        capacity: units per period (the burst a full bucket admits).
        interval: emission interval, ``period / capacity``.
        cost: units this request takes (0 only reads).
    """
    base = now if tat is None or tat < now else tat
    tolerance = capacity * interval
    if cost > capacity:
        remaining = max(0, (tolerance - (base - now)) // interval)
        return (_TOO_LARGE, base, remaining, base - now, 0)
    new_tat = base + cost * interval
    if new_tat - now <= tolerance:
        return (_ALLOWED, new_tat, (tolerance - (new_tat - now)) // interval, new_tat - now, 0)
    remaining = max(0, (tolerance - (base - now)) // interval)
    return (_LIMITED, base, remaining, base - now, new_tat - tolerance - now)


def rescaled(tat: int, stored_interval: int, interval: int, now: int) -> int:
    """``tat`` written at ``stored_interval``, read at ``interval``: the same units counted."""
    if stored_interval == interval or tat <= now:
        return tat
    return now + -(-(tat - now) * interval // stored_interval)


def gcra_adjust(tat: int | None, now: int, interval: int, delta: int) -> int | None:
    """Charge (``delta > 0``) or refund (``delta < 0``) units after the fact.

    Not clamped above: a charge may put the client in debt (its ``tat`` beyond the tolerance),
    so later requests wait until the debt is paid. A refund stops at full: returns None (the
    state can be deleted) when the bucket is full again.
    """
    base = now if tat is None or tat < now else tat
    new_tat = base + delta * interval
    return None if new_tat <= now else new_tat

"""Fixed window counting, aligned to the calendar (a window of length ``w`` ends at ``k * w``).

For users who want "1000 per day, reset at midnight UTC". A client may spend a window's
capacity at its end and the next one's at its start: that is the known price of the algorithm.
State is ``(window_end, count)``; a state from an older window counts as empty.
"""

from __future__ import annotations

from .verdict import Verdict

_ALLOWED, _LIMITED, _TOO_LARGE = Verdict.ALLOWED, Verdict.LIMITED, Verdict.TOO_LARGE

__all__ = ["FixedWindowResult", "fixed_window", "fixed_window_adjust"]

#: ``(verdict, (window_end, new_count), remaining, reset_after, retry_after)``: the same shape as
#: GCRA's result, the state to store second.
FixedWindowResult = tuple[int, tuple[int, int], int, int, int]


def fixed_window(
    window_end: int | None,
    count: int,
    now: int,
    capacity: int,
    length: int,
    cost: int,
    current_end: int | None = None,
) -> FixedWindowResult:
    """Decide one fixed-window limit; all times in microseconds. ``current_end``: the end of
    the window holding ``now`` when it is not a multiple of ``length`` (a calendar month)."""
    if current_end is None:
        current_end = (now // length + 1) * length
    used = count if window_end == current_end else 0
    reset_after = current_end - now
    if cost > capacity:
        return (_TOO_LARGE, (current_end, used), max(0, capacity - used), reset_after, 0)
    if used + cost <= capacity:
        return (_ALLOWED, (current_end, used + cost), capacity - used - cost, reset_after, 0)
    return (_LIMITED, (current_end, used), max(0, capacity - used), reset_after, reset_after)


def fixed_window_adjust(
    window_end: int | None,
    count: int,
    now: int,
    length: int,
    delta: int,
    current_end: int | None = None,
) -> tuple[int, int]:
    """Charge or refund units in the current window: ``(window_end, new_count)``, count >= 0."""
    if current_end is None:
        current_end = (now // length + 1) * length
    used = count if window_end == current_end else 0
    return current_end, max(0, used + delta)

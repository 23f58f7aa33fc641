"""Helpers for testing code that uses quotagate: a clock you move by hand."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that only moves when told to; pass it as ``MemoryStorage(clock=...)``.

    Starts at a realistic epoch time so that calendar-aligned windows behave as in production.
    """

    __slots__ = ("now",)

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (may be fractional)."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self.now += seconds

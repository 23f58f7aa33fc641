"""Shared type aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

__all__ = ["Algorithm", "Clock", "Reason"]

#: The current time in seconds: ``time.time`` in production, a ``FakeClock`` in tests.
Clock = Callable[[], float]

#: How a limit counts: GCRA (smooth, the default) or calendar-aligned fixed windows.
Algorithm = Literal["gcra", "fixed_window"]

#: Why a decision came out as it did.
#: ``unavailable``: the storage is down and the fallback policy is ``deny``.
Reason = Literal["allowed", "limited", "too_large", "unavailable"]

"""Shared type aliases: the ASGI interface, the clock, algorithm and reason names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, get_args

__all__ = [
    "LOG_LEVELS",
    "ASGIApp",
    "Algorithm",
    "Clock",
    "LogLevel",
    "Message",
    "Reason",
    "Receive",
    "Scope",
    "Send",
]

#: The current time in seconds: ``time.time`` in production, a ``FakeClock`` in tests.
Clock = Callable[[], float]

#: How a limit counts: GCRA (smooth, the default), fixed windows aligned to multiples of their
#: length, or ``calendar``: fixed windows of a calendar period in UTC (an hour, a day from
#: 00:00, a week from Monday, a month from the 1st, a year: a rate's period must be one of these;
#: "N/month" is then a calendar month, not 30 days). Budgets count this way.
Algorithm = Literal["gcra", "fixed_window", "calendar"]

#: Why a decision came out as it did.
#: ``unavailable``: the storage is down and the fallback policy is ``deny``.
Reason = Literal["allowed", "limited", "too_large", "unavailable"]

# The ASGI interface (https://asgi.readthedocs.io/en/latest/specs/main.html), as Starlette
# types it: a scope and its messages are plain mappings.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How much the ``quotagate`` logger says; the command line offers the same names.
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

"""Verdict codes: what a limit, and then a whole decision, answered.

The same integers are the first value of every algorithm's result, of the storage wire format
and of the Lua scripts (which cannot import this: they write the numbers, named in comments).
A decision's verdict is the largest of its limits'.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Verdict"]


class Verdict(IntEnum):
    ALLOWED = 0
    LIMITED = 1
    TOO_LARGE = 2
    """The cost exceeds the limit's whole capacity: it can never pass."""
    UNAVAILABLE = 3
    """The storage is down and the fallback policy is ``deny`` (no algorithm answers it)."""

"""Concurrency leases: at most ``limit`` holders at once, each slot expiring at a deadline.

A slot is a lease rather than a counter so that a holder that crashes without releasing cannot
keep it forever: expired leases are dropped before counting.
"""

from __future__ import annotations

from typing import NamedTuple

from .verdict import Verdict

_ALLOWED, _LIMITED, _TOO_LARGE = Verdict.ALLOWED, Verdict.LIMITED, Verdict.TOO_LARGE

__all__ = ["ConcurrencyResult", "concurrency"]

#: Advised wait when every slot is taken: when one frees is unknowable, so clients poll gently.
RETRY_AFTER_US = 1_000_000


class ConcurrencyResult(NamedTuple):
    verdict: int
    held: int
    """Live leases before this request."""
    remaining: int
    retry_after: int


def concurrency(held: int, limit: int) -> ConcurrencyResult:
    """Decide whether one more slot fits beside ``held`` live (unexpired) leases."""
    if limit < 1:
        return ConcurrencyResult(_TOO_LARGE, held, 0, 0)
    if held < limit:
        return ConcurrencyResult(_ALLOWED, held, limit - held - 1, 0)
    return ConcurrencyResult(_LIMITED, held, 0, RETRY_AFTER_US)

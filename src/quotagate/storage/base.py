"""The storage seam: one wire format that MemoryStorage and the Redis Lua scripts both run.

A decision is a small program: ``keys`` (one state key per limit, then the lease set) and
``args`` (``n``, then ``algorithm, capacity, interval_us, cost`` per limit, then optionally
``lease_limit, lease_ttl_us, lease_id``). Every storage answers it with the same flat list of
integers (see ``lua/decide.lua``), so the engine is written once and the property test can
compare storages value for value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, get_args, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..decision import Lease

__all__ = [
    "CALENDAR",
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_MS",
    "FIXED_WINDOW",
    "GCRA",
    "REDIS_CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "STORAGE_MODES",
    "TALLY",
    "Args",
    "Storage",
    "StorageMode",
    "mask_url",
    "split_query",
]

#: The first part of every Redis key, unless configured.
DEFAULT_PREFIX = "qg"
#: How long one Redis call may take before it counts as an outage, unless configured.
DEFAULT_TIMEOUT_MS = 100

#: Algorithm codes on the wire.
GCRA = 1
FIXED_WINDOW = 2
#: A fixed window of a calendar period in UTC (``algorithms.calendar``): its ``interval`` is
#: the period's code (hour 1, day 2, week 3, month 4, year 5), not a length.
CALENDAR = 3
#: What marks a tally in a program: after the limits (and the lease), ``T``, its ttl in ms,
#: then ``field, increment`` pairs, its hash's key last in ``keys``. A decision writes it only
#: when it rejects, a settlement always.
TALLY = "T"

#: Where decisions are being made (``Storage.mode``; a metric label).
StorageMode = Literal["memory", "redis", "fallback"]
STORAGE_MODES: tuple[StorageMode, ...] = get_args(StorageMode)
Args = Sequence[int | str]

#: URL schemes of ``RedisStorage`` (``RedisStorage.SCHEMES``). Declared here, not in
#: ``redis.py``, so that ``storage_from_url`` and config validation read them without importing
#: redis-py. ``valkey://`` and ``valkeys://`` are Redis URLs under another name.
REDIS_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", *REDIS_CLUSTER_SCHEMES)


@runtime_checkable
class Storage(Protocol):
    """Where limit state lives. Constructors only store arguments; ``start`` connects."""

    @property
    def mode(self) -> StorageMode:
        """Where decisions are being made right now."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def decide(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        """Run one decision (see module docstring); ``now_us`` overrides the clock (tests)."""
        ...

    async def adjust(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        """Charge or refund: ``args`` as for decide with a signed delta in place of the cost,
        then optionally the id of a lease to release (its key last in ``keys``).

        Returns ``[now_us, remaining, reset_after_us, ...]`` (two values per limit).
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give a concurrency slot back; releasing an expired or unknown lease is a no-op."""
        ...

    async def read_tallies(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """The counts of each tally hash (``{}`` for one never written or expired)."""
        ...

    async def reset(self) -> int:
        """Forget every limit's state (every client starts afresh); returns how many states
        were dropped. Held leases go too: releasing one later is a no-op. Tallies (usage) and
        issued keys stay: they are records, not limit state."""
        ...


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def split_query(url: str, names: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Split quotagate's own query parameters (``names``) off a storage URL."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        (ours.__setitem__(name, value) if name in names else rest.append((name, value)))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours

"""In-process storage: the embedded default, and the fallback while Redis is down.

Runs the same program as ``lua/decide.lua`` on a dict, synchronously inside one ``await``, so a
decision is atomic on the event loop without a lock.

Memory is bounded. The dict is kept in least-recently-written order (a write moves its key to
the end). States whose bucket is full again are equivalent to no state: whenever the table has
doubled since the last sweep, one pass drops them all (amortised O(1) per new key), so the
table holds at most about twice the clients that are still limited. At ``max_keys`` the least
recently used states are evicted, a batch of 1% at a time; a decision is never refused. A plain
dict rather than an OrderedDict: half the memory per client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import islice
from typing import Any, ClassVar

from .._types import Clock
from ..algorithms import concurrency, fixed_window, fixed_window_adjust, gcra, gcra_adjust
from ..algorithms.calendar import calendar_bounds
from ..algorithms.gcra import rescaled
from ..decision import Lease
from ..errors import ConfigError
from .base import CALENDAR, GCRA, TALLY, Args, StorageMode

__all__ = ["MemoryStorage"]

# GCRA: theoretical arrival time; fixed window: (window_end, count); leases: {id: expires_at}.
_State = tuple[int, int] | dict[str, int]  # (tat, interval), (window_end, count), leases

#: The table is swept once it has grown to this many states, and then each time it doubles.
_FIRST_SWEEP = 1024


class MemoryStorage:
    """Limit state in this process's memory.

    Args:
        clock: seconds as a float; ``time.time`` by default, a ``FakeClock`` in tests.
        max_keys: most states kept; past it the least recently used is evicted.
    """

    #: URL schemes that name this storage in ``storage_from_url``.
    SCHEMES: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, clock: Clock | None = None, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ConfigError(f"max_keys must be at least 1, got {max_keys!r}")
        self.clock: Clock = clock or time.time
        self.max_keys = max_keys
        # Keyed by hash(state key): the 64-bit hash of a key string is stored instead of the
        # string, a third of the memory per client. Two keys colliding would share a limit;
        # among a million live keys the odds are about 1 in 30 million.
        self._states: dict[int, _State] = {}
        # The usage ledger's hashes: key -> (counts, expiry in us). Apart from the limit
        # states: never evicted for room, only when they expire (a count is not a cache).
        self._tallies: dict[str, tuple[dict[str, int], int]] = {}
        self._sweep_at = _FIRST_SWEEP
        self._evict_batch = max(1, max_keys // 100)

    @property
    def mode(self) -> StorageMode:
        return "memory"

    def __len__(self) -> int:
        return len(self._states)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> MemoryStorage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def now_us(self) -> int:
        if self.clock is time.time:  # the default: integer microseconds without a float
            return time.time_ns() // 1000
        return round(self.clock() * 1_000_000)

    async def decide(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        return self.decide_now(keys, args, self.now_us() if now_us is None else now_us)

    def decide_now(self, keys: Sequence[str], args: Sequence[Any], now: int) -> list[int]:
        """The synchronous body of ``decide`` (the engine and FallbackStorage call it directly)."""
        states = self._states
        n: int = args[0]
        out = [0, 0, now]
        verdict = 0
        writes: list[tuple[int, _State]] = []
        unspent: list[tuple[int, int, Any, int, int]] = []
        lease_unspent: tuple[int, int] | None = None
        at = 1
        for i in range(n):
            algorithm, capacity, interval, cost = args[at : at + 4]
            at += 4
            key = hash(keys[i])
            stored = _current(states, key, algorithm, interval, now)
            result = _decide_limit(stored, algorithm, now, capacity, interval, cost)
            v = result[0]
            if v:
                if v > verdict:
                    verdict = v
            elif cost:
                writes.append((key, result[1]))
                unspent.append((len(out), algorithm, stored, capacity, interval))
            out += result[2:]

        lease: tuple[int, dict[str, int], str, int] | None = None
        if len(args) > at and args[at] != TALLY:
            limit, ttl, lease_id = int(args[at]), int(args[at + 1]), str(args[at + 2])
            lease_key = hash(keys[n])
            stored = states.get(lease_key)
            leases = stored if isinstance(stored, dict) else {}
            if leases and min(leases.values()) <= now:  # in C: the common case scans nothing
                for held_id in [k for k, expires in leases.items() if expires <= now]:
                    del leases[held_id]
            c = concurrency(len(leases), limit)
            verdict = max(verdict, c.verdict)
            if ttl > 0:
                if c.verdict == 0:
                    lease_unspent = (len(out), limit - len(leases))
                out += (c.remaining, 0, c.retry_after)
                lease = (lease_key, leases, lease_id, now + ttl)
            else:  # a read: report the free slots, take none
                out += (max(0, limit - len(leases)), 0, c.retry_after)
            at += 3

        if verdict:
            if len(args) > at:  # a tally of the rejection
                self._tally(keys[-1], args, at + 1, now)
            # Rejected: nothing is stored, so the limits that would have admitted report what
            # is left as things stand (the same numbers as a cost-0 read).
            out[0] = verdict
            for at, algorithm, stored, capacity, interval in unspent:
                read = _decide_limit(stored, algorithm, now, capacity, interval, 0)
                out[at], out[at + 1] = read[2], read[3]
            if lease_unspent is not None:
                out[lease_unspent[0]] = lease_unspent[1]
            return out
        size = len(states)
        for key, value in writes:
            if key in states:
                del states[key]  # re-inserted at the recent end
            states[key] = value
        if lease is not None:
            lease_key, leases, lease_id, expires = lease
            leases[lease_id] = expires
            if lease_key in states:
                del states[lease_key]
            states[lease_key] = leases
            out[1] = 1
        if len(states) > size:
            self._grown(now)
        return out

    def decide_one(
        self, key: str, algorithm: int, capacity: int, interval: int, cost: int, now: int
    ) -> tuple[int, Any, int, int, int]:
        """``decide_now`` for one limit and no lease, the common request, without building the
        program: ``(verdict, state, remaining, reset_after, retry_after)``."""
        states = self._states
        hashed = hash(key)
        stored = _current(states, hashed, algorithm, interval, now)
        result = _decide_limit(stored, algorithm, now, capacity, interval, cost)
        if cost and not result[0]:
            self._put(hashed, result[1], now)
        return result

    async def adjust(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        return self.adjust_now(keys, args, self.now_us() if now_us is None else now_us)

    def adjust_now(self, keys: Sequence[str], args: Args, now: int) -> list[int]:
        """The synchronous body of ``adjust``."""
        states = self._states
        out = [now]
        n = int(args[0])
        tail = 1 + 4 * n
        if len(args) > tail and args[tail] != TALLY:  # a lease to give back
            self.release_now(keys[n], str(args[tail]))
            tail += 1
        if len(args) > tail:  # a tally
            self._tally(keys[-1], args, tail + 1, now)
        for i in range(n):
            algorithm, capacity, interval, delta = (int(v) for v in args[1 + 4 * i : 5 + 4 * i])
            key = hash(keys[i])
            stored = _current(states, key, algorithm, interval, now)
            if algorithm == GCRA:
                tat = stored[0] if isinstance(stored, tuple) else None
                new_tat = gcra_adjust(tat, now, interval, delta)
                if new_tat is None:
                    states.pop(key, None)
                    out += (capacity, 0)
                else:
                    self._put(key, (new_tat, interval), now)
                    reset_after = new_tat - now
                    out += (max(0, (capacity * interval - reset_after) // interval), reset_after)
            else:
                end, count = stored if isinstance(stored, tuple) else (None, 0)
                current = _calendar_end(algorithm, interval, now)
                end, count = fixed_window_adjust(end, count, now, interval, delta, current)
                self._put(key, (end, count), now)
                out += (max(0, capacity - count), end - now)
        return out

    def _tally(self, key: str, args: Sequence[Any], at: int, now: int) -> None:
        """Add a tally's ``(field, increment)`` pairs (from ``args[at + 1:]``, after its ttl in
        ms at ``args[at]``) to the hash ``key``, kept until ``ttl`` after now."""
        counts, _ = self._tallies.get(key, ({}, 0))
        for i in range(at + 1, len(args), 2):
            field = str(args[i])
            counts[field] = counts.get(field, 0) + int(args[i + 1])
        self._tallies[key] = (counts, now + int(args[at]) * 1000)

    async def read_tallies(self, keys: Sequence[str]) -> list[dict[str, int]]:
        now = self.now_us()
        found = []
        for key in keys:
            counts, until = self._tallies.get(key, ({}, 0))
            found.append(dict(counts) if until > now else {})
        return found

    async def release(self, lease: Lease) -> None:
        self.release_now(lease.key, lease.id)

    def release_now(self, lease_key: str, lease_id: str) -> None:
        """The synchronous body of ``release``."""
        key = hash(lease_key)
        leases = self._states.get(key)
        if isinstance(leases, dict):
            leases.pop(lease_id, None)
            if not leases:
                del self._states[key]

    async def reset(self) -> int:
        dropped = len(self._states)
        self._states.clear()
        self._sweep_at = _FIRST_SWEEP
        return dropped

    def _put(self, key: int, value: _State, now: int) -> None:
        """Store a state at the recent end of the table."""
        states = self._states
        if key in states:
            del states[key]
            states[key] = value
        else:
            states[key] = value
            self._grown(now)

    def _grown(self, now: int) -> None:
        """After new states: sweep when the table has doubled, evict past ``max_keys``."""
        states = self._states
        if len(states) >= self._sweep_at:
            self.sweep(now)
            self._sweep_at = max(_FIRST_SWEEP, 2 * len(states))
        if len(states) > self.max_keys:
            # The least recently written are first in the dict's order.
            excess = len(states) - self.max_keys
            for key in list(islice(states, max(excess, self._evict_batch))):
                del states[key]

    def sweep(self, now_us: int | None = None) -> int:
        """Drop every state that no longer limits anyone; returns how many were dropped."""
        now = self.now_us() if now_us is None else now_us
        spent = [key for key, value in self._states.items() if _is_spent(value, now)]
        for key in spent:
            del self._states[key]
        return len(spent)


def _decide_limit(
    stored: _State | None, algorithm: int, now: int, capacity: int, interval: int, cost: int
) -> tuple[int, Any, int, int, int]:
    """One limit against its stored state: ``(verdict, new_state, remaining, reset_after,
    retry_after)``; a state of the other kind (or none) counts as no state. A GCRA state is
    ``(tat, interval)``: the interval it was written under, so a changed rate rescales it."""
    if algorithm == GCRA:
        v, tat, remaining, reset_after, retry_after = gcra(
            stored[0] if stored.__class__ is tuple else None,
            now,
            capacity,
            interval,
            cost,
        )
        return v, (tat, interval), remaining, reset_after, retry_after
    end, count = stored if stored.__class__ is tuple else (None, 0)
    current = _calendar_end(algorithm, interval, now)
    return fixed_window(end, count, now, capacity, interval, cost, current)


def _calendar_end(algorithm: int, interval: int, now: int) -> int | None:
    """The end of a ``CALENDAR`` limit's period (its ``interval`` is the period's code)."""
    return calendar_bounds(now, interval)[1] if algorithm == CALENDAR else None


def _current(
    states: dict[int, _State], key: int, algorithm: int, interval: int, now: int
) -> _State | None:
    """The state of ``key``; a GCRA state written under another rate is rescaled to this one
    and stored at once, whatever the verdict: from now on it refills at the new rate."""
    stored = states.get(key)
    if algorithm == GCRA and isinstance(stored, tuple) and stored[1] != interval:
        tat, written_at = stored
        stored = (rescaled(tat, written_at, interval, now), interval)
        states[key] = stored
    return stored


def _is_spent(value: _State, now: int) -> bool:
    """True when a state is equivalent to no state: full bucket, past window, no live lease."""
    if isinstance(value, tuple):  # (tat, interval) or (window_end, count)
        return value[0] <= now
    return all(expires <= now for expires in value.values())

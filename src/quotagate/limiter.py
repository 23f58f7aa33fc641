"""The engine: policy in, one storage round trip, a Decision out.

``RateLimiter.hit_many`` turns every limit of a request (each Hit's rates, and an optional
concurrency lease) into one storage program, so memory answers it in one function call and Redis
in one EVALSHA; all or nothing. ``RateLimiter.settle`` is the second call at most: every charge
or refund of a finished request and its lease release, again one program. The engine also keeps
the over-limit cache: a client that was just told "retry in T" is told so again, without a
storage call, until T has passed.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, get_args

from ._types import Algorithm, Clock, Reason
from .algorithms import Verdict
from .algorithms.calendar import CODE_OF_SECONDS
from .decision import Decision, Lease, LimitState
from .errors import ConfigError
from .keys import CONCURRENCY, hash_tagged
from .overlimit import OverlimitCache
from .rates import Rate, RateLike, as_rates
from .storage import (
    CALENDAR,
    FIXED_WINDOW,
    GCRA,
    TALLY,
    MemoryStorage,
    Storage,
    storage_from_url,
)

__all__ = ["Acquire", "Hit", "RateLimiter", "Tally"]

_MICROS = 1_000_000

# Build named tuples without their Python-level __new__ (a third faster; one per limit per
# request). Same values, same types: only the argument checking of __new__ is skipped.
_new_state: Callable[[type[LimitState], tuple[Any, ...]], LimitState] = tuple.__new__
_new_decision: Callable[[type[Decision], tuple[Any, ...]], Decision] = tuple.__new__
#: A decision's reason by its verdict code.
_REASONS: tuple[Reason, ...] = ("allowed", "limited", "too_large", "unavailable")
assert len(_REASONS) == len(Verdict)


class Hit(NamedTuple):
    """One key checked against one or more rates, at a cost (1 for a request, N for tokens).

    ``name`` says what the limit is (``requests``, ``tokens``, ...); it comes back on the
    ``LimitState`` of each rate. In ``RateLimiter.settle`` the cost is a signed charge.
    An immutable named tuple, as decisions are: several are built for every request.
    """

    key: str
    rates: RateLike
    cost: int = 1
    algorithm: Algorithm = "gcra"
    name: str = ""


class Tally(NamedTuple):
    """Counts added to one hash of the storage in the same call as a decision or a
    settlement (the gateway's usage ledger): ``key`` (hash-tagged like the request's limits,
    one Cluster slot), ``counts`` as ``(field, increment)`` pairs, kept ``ttl`` seconds after
    its last write. Read back with ``RateLimiter.tallies``."""

    key: str
    counts: tuple[tuple[str, int], ...]
    ttl: float


class Acquire(NamedTuple):
    """Ask for a concurrency slot in the same decision: at most ``limit`` holders of ``key``,
    each lease expiring after ``ttl`` seconds unless released sooner. ``ttl=0`` only reads
    (how many slots are free) and takes none."""

    key: str
    limit: int
    ttl: float = 600.0
    name: str = CONCURRENCY


class RateLimiter:
    """Checks and consumes limits against a storage.

    Args:
        storage: a Storage, or a URL for ``storage_from_url`` (``memory://`` by default).
        overlimit_cache: answer repeats of a just-rejected request in process (as Envoy's rate
            limit service does), so an abusive client costs the storage nothing. Default: on
            for shared storages, off for memory (no cheaper than the storage itself).
        clock: for the over-limit cache only; defaults to the storage's clock or a monotonic one.
    """

    def __init__(
        self,
        storage: Storage | str = "memory://",
        *,
        overlimit_cache: bool | None = None,
        overlimit_cache_size: int = 100_000,
        clock: Clock | None = None,
    ) -> None:
        self.storage: Storage = storage_from_url(storage) if isinstance(storage, str) else storage
        if overlimit_cache is None:
            overlimit_cache = not isinstance(self.storage, MemoryStorage)
        self._cache = (
            OverlimitCache(
                clock or getattr(self.storage, "clock", None) or time.monotonic,
                overlimit_cache_size,
            )
            if overlimit_cache
            else None
        )
        self._memory = self.storage if type(self.storage) is MemoryStorage else None
        # Lease ids: unique among every limiter sharing a storage (a random prefix of this
        # one's) without a system call per lease (os.urandom was one per request).
        self._lease_prefix = os.urandom(8).hex() + "."
        self._lease_serial = itertools.count()
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def in_process(self) -> bool:
        """Decisions, adjustments and releases run without suspending (memory storage): no
        cancellation can cut them short."""
        return self._memory is not None

    async def start(self) -> None:
        """Connect the storage; idempotent and safe to call from concurrent first requests."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.storage.start()
                self._started = True

    async def aclose(self) -> None:
        async with self._start_lock:
            if self._started:
                self._started = False
                await self.storage.aclose()

    async def __aenter__(self) -> RateLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def hit(
        self, key: str, rates: RateLike, cost: int = 1, algorithm: Algorithm = "gcra"
    ) -> Decision:
        """Check and consume ``cost`` units of every rate on ``key``; ``cost=0`` only reads."""
        decision = self.hit_now(key, rates, cost, algorithm)
        if decision is not None:
            return decision
        keys: list[str] = []
        args: list[int | str] = [0]
        meta: list[_Meta] = []
        _add(keys, args, meta, key, rates, cost, algorithm, "", adjusting=False)
        return await self._decide(keys, args, meta, None, None)

    def hit_now(
        self, key: str, rates: RateLike, cost: int = 1, algorithm: Algorithm = "gcra"
    ) -> Decision | None:
        """``hit`` decided without suspending when it can be: one limit, memory storage, no
        over-limit cache (the common request, made short). None when it cannot: await ``hit``."""
        memory = self._memory
        if memory is None or self._cache is not None or cost.__class__ is not int or cost < 0:
            return None
        template = _template(rates if isinstance(rates, str | Rate) else tuple(rates), algorithm)
        if len(template) != 1:
            return None
        suffix, code, capacity, interval, rate = template[0]
        state_key = hash_tagged(key) + suffix
        verdict, _, remaining, reset_us, retry_us = memory.decide_one(
            state_key, code, capacity, interval, cost, memory.now_us()
        )
        reset_after = reset_us / _MICROS
        retry_after = math.inf if cost > capacity else retry_us / _MICROS
        state = (state_key, rate, capacity, remaining, reset_after, retry_after, "")
        return _new_decision(
            Decision,
            (
                not verdict,
                _REASONS[verdict],
                retry_after if verdict else 0.0,
                capacity,
                remaining,
                reset_after,
                (_new_state(LimitState, state),),
                None,
                "",
            ),
        )

    async def hit_many(
        self,
        hits: Sequence[Hit],
        *,
        acquire: Acquire | None = None,
        shadow: bool = False,
        rejected: Tally | None = None,
        now_us: int | None = None,
    ) -> Decision:
        """Check and consume every hit, plus an optional concurrency slot, in ONE storage call.

        All or nothing: when any limit rejects, nothing is consumed and no slot is taken, and
        ``rejected`` is counted (in the same call).
        ``shadow``: a trial of limits that must not refuse anyone yet. The decision is still
        reported as it fell, but a rejected request is counted all the same (its costs
        charged, unclamped, in one more storage call) so the counters show the real traffic.
        ``now_us`` overrides the storage clock (tests only).
        """
        keys: list[str] = []
        args: list[int | str] = [0]
        meta: list[_Meta] = []
        for h in hits:
            _add(keys, args, meta, h.key, h.rates, h.cost, h.algorithm, h.name, adjusting=False)
        decision = await self._decide(keys, args, meta, acquire, now_us, rejected)
        if shadow and not decision.allowed and decision.reason != "unavailable":
            await self.settle(hits)
        return decision

    async def _decide(
        self,
        keys: list[str],
        args: list[int | str],
        meta: list[_Meta],
        acquire: Acquire | None,
        now_us: int | None,
        tally: Tally | None = None,
    ) -> Decision:
        args[0] = len(meta)
        cache = self._cache
        # The state keys name every (key, rate, algorithm): together they identify the question.
        # A rejection to tally goes to the storage: the count is its, not this process's.
        cacheable = cache is not None and acquire is None and tally is None and meta
        cache_key = tuple(keys) if cacheable else None
        if cache and cache_key is not None:
            cached = cache.get(cache_key, [m[2] for m in meta])
            if cached is not None:
                return cached
        lease_id = ""
        if acquire is not None:
            if acquire.limit < 0 or not acquire.ttl >= 0:
                raise ConfigError(f"bad concurrency limit or ttl in {acquire!r}")
            lease_id = self._lease_prefix + format(next(self._lease_serial), "x")
            keys.append(hash_tagged(acquire.key))
            args += (acquire.limit, round(acquire.ttl * _MICROS), lease_id)
        if tally is not None:
            _add_tally(keys, args, tally)
        if self._memory is not None:  # no await needed: one fewer coroutine per decision
            memory = self._memory
            out = memory.decide_now(keys, args, memory.now_us() if now_us is None else now_us)
        else:
            out = await self.storage.decide(keys, args, now_us)
        decision = _decision(out, meta, acquire, lease_id)
        if cache is not None and cache_key is not None and decision.reason == "limited":
            cache.remember(cache_key, tuple(m[2] for m in meta), decision)
        return decision

    async def adjust(
        self, key: str, rates: RateLike, delta: int, algorithm: Algorithm = "gcra"
    ) -> tuple[LimitState, ...]:
        """Charge (``delta > 0``) or refund (``delta < 0``) units after the fact.

        Token reconciliation uses it: reserve the estimate, then settle on the real usage.
        A charge is not clamped (the client goes into debt); a refund stops at a full bucket.
        """
        keys: list[str] = []
        args: list[int | str] = [0]
        meta: list[_Meta] = []
        _add(keys, args, meta, key, rates, delta, algorithm, "", adjusting=True)
        return await self._adjust(keys, args, meta, None)

    async def settle(
        self, charges: Sequence[Hit], release: Lease | None = None, tally: Tally | None = None
    ) -> tuple[LimitState, ...]:
        """Everything a finished request still owes, in ONE storage call: each charge
        (``cost > 0``) or refund (``cost < 0``) of its hits, the release of its lease and
        its ``tally``.

        Hits whose cost is 0 are left out; with nothing to charge and no tally the lease is
        released alone, and with no lease either no call is made. Returns the state of each
        charged rate.
        """
        keys: list[str] = []
        args: list[int | str] = [0]
        meta: list[_Meta] = []
        for h in charges:
            if h.cost:
                _add(keys, args, meta, h.key, h.rates, h.cost, h.algorithm, h.name, adjusting=True)
        if not meta and tally is None:
            if release is not None:  # the lease alone: a plain release (ZREM), no script
                await self.release(release)
            return ()
        return await self._adjust(keys, args, meta, release, tally)

    async def tallies(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """The counts of each tally hash (empty for one never written or expired)."""
        if not self._started:
            await self.start()
        return await self.storage.read_tallies([hash_tagged(key) for key in keys])

    async def _adjust(
        self,
        keys: list[str],
        args: list[int | str],
        meta: list[_Meta],
        release: Lease | None,
        tally: Tally | None = None,
    ) -> tuple[LimitState, ...]:
        args[0] = len(meta)
        if release is not None:
            keys.append(release.key)
            args.append(release.id)
        if tally is not None:
            _add_tally(keys, args, tally)
        memory = self._memory
        if memory is not None:
            out = memory.adjust_now(keys, args, memory.now_us())
        else:
            out = await self.storage.adjust(keys, args)
        if self._cache is not None:
            self._cache.forget(state_key for state_key, _, cost, _ in meta if cost < 0)
        return tuple(
            LimitState(
                state_key, rate, rate.amount, out[1 + 2 * i], out[2 + 2 * i] / _MICROS, 0.0, name
            )
            for i, (state_key, rate, _, name) in enumerate(meta)
        )

    async def acquire(self, key: str, limit: int, ttl: float = 600.0) -> Lease | None:
        """Take one of ``limit`` concurrency slots of ``key`` for at most ``ttl`` seconds."""
        return (await self.hit_many((), acquire=Acquire(key, limit, ttl))).lease

    async def release(self, lease: Lease) -> None:
        """Give a slot back (on completion, error, disconnect). Idempotent."""
        if self._memory is not None:
            self._memory.release_now(lease.key, lease.id)
            return
        await self.storage.release(lease)

    def limits_changed(self) -> None:
        """Rates were changed (a reload): the over-limit cache's rejections were decided under
        the old ones, so they go. The counters stay: a state is kept per period and read at
        the new rate (see ``algorithms.gcra``)."""
        if self._cache is not None:
            self._cache.clear()

    async def reset(self) -> int:
        """Forget every limit's state: every client starts afresh (a test's fresh start, an
        operator's clean slate). On Redis that is every key under the storage's prefix, for
        every instance sharing it. Returns how many states were dropped."""
        if not self._started:
            await self.start()
        if self._cache is not None:
            self._cache.clear()
        return await self.storage.reset()


_Meta = tuple[str, Rate, int, str]  # (state key, rate, cost, name)
_Template = tuple[tuple[str, int, int, int, Rate], ...]


@lru_cache(maxsize=4096)
def _template(rates: str | Rate | tuple[Rate, ...], algorithm: str) -> _Template:
    """Per rate: state key suffix, algorithm code, capacity, interval; cached per rate text.

    A state is named by its period, not its amount, so a changed amount keeps what was counted
    (a second rate of the same period gets ``#2``)."""
    if algorithm not in get_args(Algorithm):
        raise ConfigError(
            f"algorithm must be one of {list(get_args(Algorithm))}, got {algorithm!r}"
        )
    template = []
    seen: dict[str, int] = {}
    for r in as_rates(rates):
        seen[r.key_suffix] = n = seen.get(r.key_suffix, 0) + 1
        suffix = r.key_suffix if n == 1 else f"{r.key_suffix}#{n}"
        if algorithm == "gcra":
            template.append((":" + suffix, GCRA, r.amount, r.interval_us, r))
        elif algorithm == "fixed_window":
            template.append((":fw:" + suffix, FIXED_WINDOW, r.amount, r.period_us, r))
        else:
            template.append((":cal:" + suffix, CALENDAR, r.amount, _calendar_code(r), r))
    return tuple(template)


def _calendar_code(rate: Rate) -> int:
    code = CODE_OF_SECONDS.get(int(rate.period)) if rate.period == int(rate.period) else None
    if code is None:
        raise ConfigError(
            f"a calendar limit's period is an hour, a day, a week, a month or a year (got {rate})"
        )
    return code


def _add(
    keys: list[str],
    args: list[int | str],
    meta: list[_Meta],
    key: str,
    rates: RateLike,
    cost: int,
    algorithm: str,
    name: str,
    *,
    adjusting: bool,
) -> None:
    """Append the storage program of one key's limits to ``keys`` / ``args`` / ``meta``."""
    if cost.__class__ is not int and (not isinstance(cost, int) or isinstance(cost, bool)):
        raise ConfigError(f"cost must be an integer, got {cost!r}")
    if cost < 0 and not adjusting:
        raise ConfigError(f"cost must be a non-negative integer, got {cost!r}")
    tagged = hash_tagged(key)
    template = _template(rates if isinstance(rates, str | Rate) else tuple(rates), algorithm)
    for suffix, code, capacity, interval, rate in template:
        state_key = tagged + suffix
        keys.append(state_key)
        args += (code, capacity, interval, cost)
        meta.append((state_key, rate, cost, name))


def _add_tally(keys: list[str], args: list[int | str], tally: Tally) -> None:
    """The tally's part of a storage program: its key last, then ``T``, ttl in ms, pairs."""
    keys.append(hash_tagged(tally.key))
    args += (TALLY, max(1, round(tally.ttl * 1000)))
    for field, increment in tally.counts:
        args += (field, increment)


def _decision(
    out: Sequence[int], meta: Sequence[_Meta], acquire: Acquire | None, lease_id: str
) -> Decision:
    """Turn a storage answer into a Decision, picking the most restrictive limit.

    Admitted: the rate state with the smallest ``remaining / limit`` (ties: the longer
    ``reset_after``). Rejected: the state that forced the longest ``retry_after``.
    """
    verdict = out[0]
    allowed = not verdict
    states: list[LimitState] = []
    pick: LimitState | None = None
    best = 2.0  # admitted: fraction left of the pick; rejected: its retry_after
    at = 3
    for state_key, rate, cost, name in meta:
        capacity = rate.amount
        remaining = out[at]
        state = _new_state(
            LimitState,
            (
                state_key,
                rate,
                capacity,
                remaining,
                out[at + 1] / _MICROS,
                math.inf if cost > capacity else out[at + 2] / _MICROS,
                name,
            ),
        )
        at += 3
        states.append(state)
        if allowed:
            fraction = remaining / capacity
            if (
                pick is None
                or fraction < best
                or (fraction == best and state.reset_after > pick.reset_after)
            ):
                pick, best = state, fraction
        elif pick is None or state.retry_after > best:
            pick, best = state, state.retry_after
    lease: Lease | None = None
    if acquire is not None:
        lease_key = hash_tagged(acquire.key)
        limit = acquire.limit
        retry_after = math.inf if limit < 1 else out[at + 2] / _MICROS
        state = LimitState(lease_key, None, limit, out[at], 0.0, retry_after, acquire.name)
        states.append(state)
        # An admitted request's slot is back when it ends: it is the most restrictive limit
        # only when there is no rate limit to report.
        if pick is None or (not allowed and retry_after > best):
            pick = state
        if out[1]:
            lease = Lease(lease_key, lease_id, out[2] + round(acquire.ttl * _MICROS))
    if pick is None:
        return Decision(allowed, _REASONS[verdict], 0.0, 0, 0, 0.0, (), lease)
    return _new_decision(
        Decision,
        (
            allowed,
            _REASONS[verdict],
            0.0 if allowed else pick.retry_after,
            pick.limit,
            pick.remaining,
            pick.reset_after,
            tuple(states),
            lease,
            pick.name,
        ),
    )

"""The engine: policy in, one storage round trip, a Decision out.

``RateLimiter.hit_many`` turns every limit of a request (each Hit's rates, and an optional
concurrency lease) into one storage program, so memory answers it in one function call and Redis
in one EVALSHA; all or nothing. It also keeps the over-limit cache: a client that was just told
"retry in T" is told so again, without a storage call, until T has passed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._types import Algorithm, Clock, Reason
from .decision import Decision, Lease, LimitState
from .errors import ConfigError
from .rates import Rate, RateLike, as_rates
from .storage import FIXED_WINDOW, GCRA, Storage, storage_from_url

__all__ = ["Acquire", "Hit", "RateLimiter", "hash_tagged"]

_MICROS = 1_000_000
_REASONS: tuple[Reason, ...] = ("allowed", "limited", "too_large", "unavailable")


@dataclass(frozen=True, slots=True)
class Hit:
    """One key checked against one or more rates, at a cost (1 for a request, N for tokens)."""

    key: str
    rates: RateLike
    cost: int = 1
    algorithm: Algorithm = "gcra"


@dataclass(frozen=True, slots=True)
class Acquire:
    """Ask for a concurrency slot in the same decision: at most ``limit`` holders of ``key``,
    each lease expiring after ``ttl`` seconds unless released sooner."""

    key: str
    limit: int
    ttl: float = 600.0


def hash_tagged(key: str) -> str:
    """``key`` with a Redis Cluster hash tag: kept if it has one, else the whole key braced."""
    start = key.find("{")
    if start != -1 and key.find("}", start + 2) != -1:
        return key
    return "{" + key + "}"


_Plan = tuple[list[str], list[int | str], list[tuple[str, Rate, int]]]
_CacheKey = tuple[tuple[str, tuple[Rate, ...], str], ...]


class RateLimiter:
    """Checks and consumes limits against a storage.

    Args:
        storage: a Storage, or a URL for ``storage_from_url`` (``memory://`` by default).
        overlimit_cache: answer repeats of a just-rejected request in process (as Envoy's rate
            limit service does), so an abusive client costs the storage nothing.
        clock: for the over-limit cache only; defaults to the storage's clock or a monotonic one.
    """

    def __init__(
        self,
        storage: Storage | str = "memory://",
        *,
        overlimit_cache: bool = True,
        overlimit_cache_size: int = 100_000,
        clock: Clock | None = None,
    ) -> None:
        self.storage: Storage = storage_from_url(storage) if isinstance(storage, str) else storage
        self._clock: Clock = clock or getattr(self.storage, "clock", None) or time.monotonic
        self._cache: dict[_CacheKey, tuple[float, tuple[int, ...], Decision]] | None = (
            {} if overlimit_cache else None
        )
        self._cache_size = overlimit_cache_size
        self._cache_by_key: dict[str, set[_CacheKey]] = {}

    async def start(self) -> None:
        await self.storage.start()

    async def aclose(self) -> None:
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
        return await self.hit_many((Hit(key, rates, cost, algorithm),))

    async def hit_many(
        self, hits: Sequence[Hit], *, acquire: Acquire | None = None, now_us: int | None = None
    ) -> Decision:
        """Check and consume every hit, plus an optional concurrency slot, in ONE storage call.

        All or nothing: when any limit rejects, nothing is consumed and no slot is taken.
        ``now_us`` overrides the storage clock (tests only).
        """
        keys, args, meta = _plan(hits, adjusting=False)
        cache_key: _CacheKey | None = None
        if self._cache is not None and acquire is None and hits:
            cache_key = tuple((hash_tagged(h.key), as_rates(h.rates), h.algorithm) for h in hits)
            cached = self._cached(cache_key, tuple(h.cost for h in hits))
            if cached is not None:
                return cached
        lease_id = ""
        if acquire is not None:
            if acquire.limit < 0 or not acquire.ttl > 0:
                raise ConfigError(f"bad concurrency limit or ttl in {acquire!r}")
            lease_id = os.urandom(8).hex()
            keys.append(hash_tagged(acquire.key))
            args += (acquire.limit, max(1, round(acquire.ttl * _MICROS)), lease_id)
        out = await self.storage.decide(keys, args, now_us)
        decision = _decision(out, meta, acquire, lease_id)
        if cache_key is not None and decision.reason == "limited":
            self._remember(cache_key, tuple(h.cost for h in hits), decision)
        return decision

    async def adjust(
        self, key: str, rates: RateLike, delta: int, algorithm: Algorithm = "gcra"
    ) -> tuple[LimitState, ...]:
        """Charge (``delta > 0``) or refund (``delta < 0``) units after the fact.

        Token reconciliation uses it: reserve the estimate, then settle on the real usage.
        A charge is not clamped (the client goes into debt); a refund stops at a full bucket.
        """
        keys, args, meta = _plan((Hit(key, rates, delta, algorithm),), adjusting=True)
        out = await self.storage.adjust(keys, args)
        if delta < 0:
            self._forget(hash_tagged(key))
        return tuple(
            LimitState(state_key, rate, rate.amount, out[1 + 2 * i], out[2 + 2 * i] / _MICROS, 0.0)
            for i, (state_key, rate, _) in enumerate(meta)
        )

    async def acquire(self, key: str, limit: int, ttl: float = 600.0) -> Lease | None:
        """Take one of ``limit`` concurrency slots of ``key`` for at most ``ttl`` seconds."""
        return (await self.hit_many((), acquire=Acquire(key, limit, ttl))).lease

    async def release(self, lease: Lease) -> None:
        """Give a slot back (on completion, error, disconnect). Idempotent."""
        await self.storage.release(lease)

    def _cached(self, cache_key: _CacheKey, costs: tuple[int, ...]) -> Decision | None:
        assert self._cache is not None
        entry = self._cache.get(cache_key)
        if entry is None:
            return None
        until, cached_costs, decision = entry
        wait = until - self._clock()
        if wait <= 0 or any(c < old for c, old in zip(costs, cached_costs, strict=True)):
            return None
        elapsed = decision.retry_after - wait
        return Decision(
            False,
            "limited",
            wait,
            decision.limit,
            decision.remaining,
            max(0.0, decision.reset_after - elapsed),
            tuple(
                LimitState(
                    s.key,
                    s.rate,
                    s.limit,
                    s.remaining,
                    max(0.0, s.reset_after - elapsed),
                    max(0.0, s.retry_after - elapsed),
                )
                for s in decision.states
            ),
        )

    def _remember(self, cache_key: _CacheKey, costs: tuple[int, ...], decision: Decision) -> None:
        assert self._cache is not None
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
            self._cache_by_key.clear()
        self._cache[cache_key] = (self._clock() + decision.retry_after, costs, decision)
        for key, _, _ in cache_key:
            self._cache_by_key.setdefault(key, set()).add(cache_key)

    def _forget(self, key: str) -> None:
        """A refund on ``key`` may let a cached rejection pass sooner: drop those entries."""
        if self._cache is None:
            return
        for cache_key in self._cache_by_key.pop(key, ()):
            self._cache.pop(cache_key, None)


def _plan(hits: Iterable[Hit], *, adjusting: bool) -> _Plan:
    """The storage program for ``hits``: keys, args, and (state key, rate) for each limit."""
    keys: list[str] = []
    args: list[int | str] = [0]
    meta: list[tuple[str, Rate, int]] = []
    for hit in hits:
        cost = hit.cost
        if not adjusting and (isinstance(cost, bool) or not isinstance(cost, int) or cost < 0):
            raise ConfigError(f"cost must be a non-negative integer, got {cost!r}")
        tagged = hash_tagged(hit.key)
        if hit.algorithm == "gcra":
            for rate in as_rates(hit.rates):
                state_key = f"{tagged}:{rate.key_suffix}"
                keys.append(state_key)
                args += (GCRA, rate.amount, rate.interval_us, cost)
                meta.append((state_key, rate, cost))
        elif hit.algorithm == "fixed_window":
            for rate in as_rates(hit.rates):
                state_key = f"{tagged}:fw:{rate.key_suffix}"
                keys.append(state_key)
                args += (FIXED_WINDOW, rate.amount, rate.period_us, cost)
                meta.append((state_key, rate, cost))
        else:
            raise ConfigError(f"algorithm must be 'gcra' or 'fixed_window', got {hit.algorithm!r}")
    args[0] = len(meta)
    return keys, args, meta


def _decision(
    out: Sequence[int],
    meta: Sequence[tuple[str, Rate, int]],
    acquire: Acquire | None,
    lease_id: str,
) -> Decision:
    """Turn a storage answer into a Decision, picking the most restrictive limit."""
    verdict = out[0]
    allowed = verdict == 0
    states: list[LimitState] = []
    for i, (state_key, rate, cost) in enumerate(meta):
        at = 3 + 3 * i
        retry_after = math.inf if cost > rate.amount else out[at + 2] / _MICROS
        states.append(
            LimitState(state_key, rate, rate.amount, out[at], out[at + 1] / _MICROS, retry_after)
        )
    lease: Lease | None = None
    if acquire is not None:
        at = 3 + 3 * len(meta)
        lease_key = hash_tagged(acquire.key)
        retry_after = math.inf if acquire.limit < 1 else out[at + 2] / _MICROS
        states.append(LimitState(lease_key, None, acquire.limit, out[at], 0.0, retry_after))
        if out[1]:
            lease = Lease(lease_key, lease_id, out[2] + round(acquire.ttl * _MICROS))
    reason = _REASONS[verdict]
    if not states:
        return Decision(allowed, reason, 0.0, 0, 0, 0.0, (), lease)
    if allowed:
        pick = min(states, key=_fullness)
        retry_after = 0.0
    else:
        pick = max(states, key=_wait)
        retry_after = pick.retry_after
    return Decision(
        allowed,
        reason,
        retry_after,
        pick.limit,
        pick.remaining,
        pick.reset_after,
        tuple(states),
        lease,
    )


def _fullness(state: LimitState) -> tuple[float, float]:
    """Order states from most to least restrictive when admitting: least left, then slowest."""
    return (state.remaining / state.limit if state.limit else 0.0, -state.reset_after)


def _wait(state: LimitState) -> float:
    return state.retry_after

"""Redis first, process memory while Redis is down: the seed tutorial's "fallback, with a
logged warning", done so that limits keep being enforced and nothing is silently dropped.

A circuit breaker: the first failed call opens it (ONE warning), every decision then runs in
memory without waiting on Redis, a background probe retries Redis with backoff, and the first
good probe closes it again (ONE info line).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Literal, get_args

from ..algorithms import Verdict
from ..decision import Lease
from ..errors import ConfigError, StorageError
from .base import GCRA, TALLY, Args, Storage, StorageMode
from .memory import MemoryStorage

__all__ = ["FALLBACK_POLICIES", "FallbackPolicy", "FallbackStorage"]

logger = logging.getLogger("quotagate")

#: What a FallbackStorage does while its primary is down (see the class docstring).
FallbackPolicy = Literal["memory", "allow", "deny"]
FALLBACK_POLICIES: tuple[FallbackPolicy, ...] = get_args(FallbackPolicy)

#: Leases remembered for release when Redis is back; past this, the rest expire by deadline.
_MAX_UNRELEASED = 100_000
#: Releases sent together when Redis is back (they share round trips on the pipelined link).
_RELEASE_BATCH = 512


class FallbackStorage:
    """Wrap a shared storage (Redis) with an in-process fallback.

    Args:
        primary: the shared storage, normally a ``RedisStorage``.
        policy: while the primary is down: ``memory`` limits in this process, ``allow`` admits
            everything (counted as unlimited), ``deny`` rejects everything (503 in the gateway).
        share: in ``memory`` mode each process admits this share of every limit, so that N
            replicas falling back together do not admit N times the traffic (``1/N``).
        probe_interval: first wait before re-probing the primary; it doubles on each failure,
            up to ``max_probe_interval``.
    """

    def __init__(
        self,
        primary: Storage,
        *,
        policy: FallbackPolicy = "memory",
        share: float = 1.0,
        memory: MemoryStorage | None = None,
        probe_interval: float = 0.25,
        max_probe_interval: float = 2.0,
    ) -> None:
        if policy not in FALLBACK_POLICIES:
            raise ConfigError(
                f"fallback must be one of {', '.join(FALLBACK_POLICIES)}, got {policy!r}"
            )
        if not 0 < share <= 1:
            raise ConfigError(f"fallback_share must be in (0, 1], got {share!r}")
        self.primary = primary
        self.policy: FallbackPolicy = policy
        self.share = share
        self.memory = memory or MemoryStorage()
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        #: How many outages began since start (one warning each).
        self.outages = 0
        self._down_since: float | None = None
        self._next_probe_at = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._unreleased: list[Lease] = []
        self._tallies: list[tuple[str, list[int | str]]] = []  # usage counts for the primary
        self._tallies_lost = False
        # Ids of leases granted while the breaker was open: they live in memory only, and their
        # release never needs Redis (without this, a long outage queues every one of them).
        self._local_leases: set[str] = set()

    @property
    def mode(self) -> StorageMode:
        return "redis" if self._down_since is None else "fallback"

    @property
    def server_version(self) -> str | None:
        return getattr(self.primary, "server_version", None)

    async def start(self) -> None:
        """Start the primary; if it is down, start in fallback rather than refuse to serve."""
        try:
            await self.primary.start()
        except StorageError as exc:
            self._trip(exc)

    async def aclose(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None
        await self.primary.aclose()

    async def __aenter__(self) -> FallbackStorage:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def decide(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        if self._down_since is None:
            try:
                return await self.primary.decide(keys, args, now_us)
            except StorageError as exc:
                self._trip(exc)
                # A call that timed out may still have run on Redis, lease and all: its lease
                # is not "local", its release goes to Redis too (same id).
                keys, args, tally = _without_tally(keys, args)
                out = self._decide_degraded(keys, args, now_us, local=False)
        else:
            keys, args, tally = _without_tally(keys, args)
            out = self._decide_degraded(keys, args, now_us)
        if tally is not None and out[0]:
            self._keep(tally)
        return out

    async def adjust(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        keys, args, tally = _without_tally(keys, args)
        if self._down_since is None:
            try:
                full = (keys, args) if tally is None else ([*keys, tally[0]], [*args, *tally[1]])
                return await self.primary.adjust(*full, now_us)
            except StorageError as exc:
                self._trip(exc)
        if tally is not None:
            self._keep(tally)
        return await self._adjust_degraded(keys, args, now_us)

    async def read_tallies(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """The primary's: tallies counted during an outage reach it when it is back."""
        return await self.primary.read_tallies(keys)

    def _keep(self, tally: tuple[str, list[int | str]]) -> None:
        """A tally the primary could not take: written there when it is back."""
        if len(self._tallies) < _MAX_UNRELEASED:
            self._tallies.append(tally)
        elif not self._tallies_lost:
            self._tallies_lost = True
            logger.warning(
                "quotagate: usage counts of this outage beyond %d are lost", _MAX_UNRELEASED
            )

    async def _adjust_degraded(
        self, keys: Sequence[str], args: Args, now_us: int | None
    ) -> list[int]:
        n = int(args[0])
        release: Lease | None = None
        if len(args) > 1 + 4 * n:  # a lease given back too: released as ``release`` would
            release = Lease(keys[n], str(args[1 + 4 * n]), 0)
            self.memory.release_now(release.key, release.id)
            keys, args = keys[:n], args[: 1 + 4 * n]
            if release.id in self._local_leases:
                self._local_leases.discard(release.id)
            else:
                keys, args = [*keys, release.key], [*args, release.id]
        if self._down_since is None:
            try:
                return await self.primary.adjust(keys, args, now_us)
            except StorageError as exc:
                self._trip(exc)
        if len(keys) > n:  # a Redis lease: released when Redis is back
            keys, args = keys[:n], args[: 1 + 4 * n]
            if release is not None and len(self._unreleased) < _MAX_UNRELEASED:
                self._unreleased.append(release)
        now = self.memory.now_us() if now_us is None else now_us
        if self.policy == "memory":
            return self.memory.adjust_now(keys, self._scaled(args), now)
        out = [now]
        for i in range(n):
            out += (int(args[2 + 4 * i]), 0)
        return out

    async def release(self, lease: Lease) -> None:
        # The lease may come from either side of an outage; releasing where it is absent is a
        # no-op. A Redis lease that cannot be released now is released when Redis is back, so
        # a short outage (or one slow call) does not hold slots until their deadline.
        await self.memory.release(lease)
        if lease.id in self._local_leases:
            self._local_leases.discard(lease.id)
            return
        if self._down_since is None:
            try:
                await self.primary.release(lease)
                return
            except StorageError as exc:
                self._trip(exc)
        if len(self._unreleased) < _MAX_UNRELEASED:
            self._unreleased.append(lease)

    async def reset(self) -> int:
        """Reset the fallback memory and the primary: a primary that is down raises
        StorageError (its shared counters were not reset)."""
        self._unreleased.clear()
        self._local_leases.clear()
        return await self.memory.reset() + await self.primary.reset()

    def _decide_degraded(
        self, keys: Sequence[str], args: Args, now_us: int | None, *, local: bool = True
    ) -> list[int]:
        now = self.memory.now_us() if now_us is None else now_us
        n = int(args[0])
        leased = len(args) > 1 + 4 * n
        if self.policy == "memory":
            out = self.memory.decide_now(keys, self._scaled(args), now)
            if leased and local and out[1]:
                self._remember_local(str(args[-1]))
            return out
        if self.policy == "allow":
            out = [0, 1 if leased else 0, now]
            for i in range(n):
                out += (int(args[2 + 4 * i]), 0, 0)
            if leased:
                out += (int(args[1 + 4 * n]), 0, 0)
                if local:
                    self._remember_local(str(args[-1]))
            return out
        retry_after = max(1_000_000, round((self._next_probe_at - time.monotonic()) * 1e6))
        out = [Verdict.UNAVAILABLE, 0, now]
        for _ in range(n + (1 if leased else 0)):
            out += (0, 0, retry_after)
        return out

    def _remember_local(self, lease_id: str) -> None:
        if len(self._local_leases) >= _MAX_UNRELEASED:
            self._local_leases.clear()  # at worst, some releases become no-op ZREMs later
        self._local_leases.add(lease_id)

    def _scaled(self, args: Args) -> Args:
        """Args with every capacity cut to ``share`` (GCRA keeps its period)."""
        if self.share >= 1:
            return args
        scaled = list(args)
        n = int(args[0])
        for i in range(n):
            at = 1 + 4 * i
            capacity = int(args[at + 1])
            smaller = max(1, int(capacity * self.share))
            scaled[at + 1] = smaller
            if int(args[at]) == GCRA:
                scaled[at + 2] = max(1, int(args[at + 2]) * capacity // smaller)
        if len(args) > 1 + 4 * n:
            scaled[1 + 4 * n] = max(1, int(int(args[1 + 4 * n]) * self.share))
        return scaled

    def _trip(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        self.outages += 1
        logger.warning(
            "quotagate: shared storage unavailable (%s); fallback policy %r until it is back",
            exc,
            self.policy,
        )
        self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        wait = self.probe_interval
        while True:
            self._next_probe_at = time.monotonic() + wait
            await asyncio.sleep(wait)
            try:
                await self.primary.start()  # reconnects, reloads scripts, re-reads the version
            except StorageError:
                wait = min(wait * 2, self.max_probe_interval)
                continue
            break
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        pending, self._unreleased = self._unreleased, []
        for at in range(0, len(pending), _RELEASE_BATCH):  # concurrent: one pipeline each
            batch = pending[at : at + _RELEASE_BATCH]
            done = await asyncio.gather(
                *(self.primary.release(lease) for lease in batch), return_exceptions=True
            )
            if any(isinstance(result, BaseException) for result in done):
                break  # down again: the rest expire at their deadlines
        tallies, self._tallies, self._tallies_lost = self._tallies, [], False
        for key, tail in tallies:
            try:
                await self.primary.adjust([key], [0, *tail])
            except StorageError:
                self._tallies.append((key, tail))  # down again: kept for the next return
        self._down_since = None
        self._probe_task = None
        logger.info(
            "quotagate: shared storage is back after %.1f s; shared limits restored", down_for
        )


def _without_tally(
    keys: Sequence[str], args: Args
) -> tuple[Sequence[str], Args, tuple[str, list[int | str]] | None]:
    """A program without its tally (``TALLY`` and after, its key last), and the tally."""
    n = int(args[0])
    for at in range(1 + 4 * n, len(args)):
        if args[at] == TALLY:
            return keys[:-1], args[:at], (keys[-1], list(args[at:]))
    return keys, args, None

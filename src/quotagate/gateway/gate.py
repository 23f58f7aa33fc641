"""A backend's queue: one shared by its replicas, ordered by tier priority (FIFO within one).

Each replica takes at most its ``max_concurrency`` requests at a time; a request goes to the
healthy replica with the fewest in flight (ties in turn). When every replica is full the request
waits, at most the queue timeout, and the first slot that frees on ANY replica serves the head of
the queue. So a burst of free-tier traffic cannot delay paying tiers: a pro request that arrives
behind fifty queued free requests takes the next free slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Backend

__all__ = ["BackendUnavailable", "Replica", "ReplicaGate"]


class BackendUnavailable(Exception):
    """No healthy replica can take the request (all down, removed, or already tried)."""


class Replica:
    """One model server of a backend, as the gate and the health checks see it."""

    __slots__ = (
        "backend",
        "failures",
        "in_flight",
        "label",
        "max_concurrency",
        "models",
        "retired",
        "up",
        "url",
    )

    def __init__(self, backend: Backend, url: str | None, label: str, max_concurrency: int) -> None:
        self.backend = backend
        self.url = url
        self.label = label
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self.up = True
        self.retired = False  # removed by a reload: finishes what it has, takes nothing new
        self.failures = 0  # in a row
        self.models: list[str] = []  # what its last ``GET /models`` listed

    @property
    def serving(self) -> bool:
        return self.up and not self.retired


class ReplicaGate:
    """Slots on ``replicas`` (the list is the pool's own: a reload changes it in place)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self._waiters: list[tuple[int, int, asyncio.Future[Replica], Collection[Replica]]] = []
        self._order = itertools.count()
        self._turn = 0

    @property
    def in_flight(self) -> int:
        return sum(replica.in_flight for replica in self.replicas)

    @property
    def max_concurrency(self) -> int:
        return sum(replica.max_concurrency for replica in self.replicas if replica.serving)

    @property
    def free(self) -> int:
        return sum(max(0, r.max_concurrency - r.in_flight) for r in self.replicas if r.serving)

    @property
    def queued(self) -> int:
        return sum(1 for *_, future, _ in self._waiters if not future.done())

    def healthy(self, exclude: Collection[Replica] = ()) -> bool:
        return any(r.serving and r not in exclude for r in self.replicas)

    async def acquire(
        self, priority: int, wait: float, exclude: Collection[Replica] = ()
    ) -> Replica | None:
        """A replica with a slot taken on it, waiting up to ``wait`` seconds; None when none
        came in time.

        Raises:
            BackendUnavailable: no healthy replica (outside ``exclude``) to wait for.
        """
        if not self._waiters:
            replica = self._pick(exclude)
            if replica is not None:
                replica.in_flight += 1
                return replica
        if not self.healthy(exclude):
            raise BackendUnavailable
        future: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future, exclude))
        try:
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            self._abandon(future)
            return None
        except asyncio.CancelledError:
            self._abandon(future)
            raise

    def release(self, replica: Replica) -> None:
        """Give a slot back; a waiter takes it (or another replica's, if it excluded this one)."""
        replica.in_flight -= 1
        if self._waiters:
            self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters, head of the queue first; fail the waiters no healthy
        replica is left for. Run when slots free, replicas come and go, or capacity changes."""
        skipped = []
        while self._waiters:
            entry = self._waiters[0]
            future, exclude = entry[2], entry[3]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            replica = self._pick(exclude)
            if replica is None:
                if not self.healthy(exclude):
                    heapq.heappop(self._waiters)
                    future.set_exception(BackendUnavailable())
                    continue
                if not exclude:
                    break  # every replica is full: the head waits, and so does the rest
                skipped.append(heapq.heappop(self._waiters))  # others may fit another replica
                continue
            heapq.heappop(self._waiters)
            replica.in_flight += 1
            future.set_result(replica)
        for entry in skipped:
            heapq.heappush(self._waiters, entry)

    def _pick(self, exclude: Collection[Replica]) -> Replica | None:
        """The healthy replica with room and the fewest in flight; ties go round in turn."""
        replicas = self.replicas
        count = len(replicas)
        if count == 1:
            only = replicas[0]
            fits = only.serving and only.in_flight < only.max_concurrency
            return only if fits and only not in exclude else None
        best: Replica | None = None
        self._turn += 1
        for i in range(count):
            replica = replicas[(self._turn + i) % count]
            if (
                replica.serving
                and replica.in_flight < replica.max_concurrency
                and replica not in exclude
                and (best is None or replica.in_flight < best.in_flight)
            ):
                best = replica
        return best

    def _abandon(self, future: asyncio.Future[Replica]) -> None:
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())  # the slot arrived just as we gave up: pass it on
        else:
            future.cancel()

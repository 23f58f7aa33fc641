"""The whole-backend cap: at most N requests in flight to the model server, the rest queued by
tier priority (FIFO within a priority), each waiting at most the queue timeout.

So a burst of free-tier traffic cannot delay paying tiers: a pro request that arrives behind
fifty queued free requests takes the next free slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["BackendGate"]


class BackendGate:
    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency
        self.free = max_concurrency
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def in_flight(self) -> int:
        return self.max_concurrency - self.free

    @property
    def queued(self) -> int:
        return sum(1 for *_, future in self._waiters if not future.done())

    async def acquire(self, priority: int, wait: float) -> bool:
        """Take a slot, waiting up to ``wait`` seconds; False when none came in time."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future))
        try:
            async with asyncio.timeout(wait):
                await future
            return True
        except TimeoutError:
            self._abandon(future)
            return False
        except asyncio.CancelledError:
            self._abandon(future)
            raise

    def _abandon(self, future: asyncio.Future[None]) -> None:
        if future.done() and not future.cancelled():
            self.release()  # the slot arrived just as we gave up: pass it on
        else:
            future.cancel()

    def release(self) -> None:
        """Return a slot: to the highest-priority waiter, or to the pool."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self.free += 1

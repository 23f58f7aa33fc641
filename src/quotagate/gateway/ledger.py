"""What an admitted request holds, and every storage call that takes or gives it back.

One engine call each: ``reserve`` (every limit and the concurrency slot, all or nothing),
``settle`` (the token reservation reconciled on the real usage, and the slot released) and
``undo`` (a request admitted but never served gives back all it took). A storage error is
logged here, once, and never reaches the client as a 500: a failed reserve is a 503 decision,
a failed settle leaves the lease to expire at its deadline.

Settling runs in a task of its own, awaited through a shield: it completes even when the
request's task is cancelled (a client that went away mid-stream), and a client that waits for
the response never finds its slot still held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .._asgi import storage_error_decision
from ..decision import Decision
from ..errors import StorageError
from ..limiter import Hit, RateLimiter, Tally
from ..metrics import PrometheusMetrics
from .budgets import Price, room
from .callers import Caller, Limits
from .relay import Used
from .usage import UsageBook

__all__ = ["Admission", "Ledger"]

logger = logging.getLogger("quotagate")


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until it is settled."""

    caller: Caller
    limits: Limits
    reserved: int
    prompt: int
    decision: Decision
    model: str | None = None  # as the client named it: the usage ledger's
    queued_s: float = 0.0  # waited for a slot, in all (``x-quotagate-queue-ms``)
    price: Price | None = None  # its model's, when it has one
    money: int = 0  # micro-dollars reserved on the tier's budgets
    #: Set when the answer is held to its reservation (``allowance``): its own ``max_tokens``,
    #: up to which more is reserved as it grows (``Ledger.extend``).
    cap: int = 0

    @property
    def allowance(self) -> int | None:
        """Output tokens reserved, which the answer is held to; None: not held (its whole
        cap was reserved)."""
        return self.reserved - self.prompt if self.cap else None

    def cost(self, used: Used | None) -> int:
        """Micro-dollars the answer cost (none: not served, or no price)."""
        if used is None or self.price is None:
            return 0
        return self.price.cost(used.prompt, used.completion)


class Ledger:
    def __init__(self, limiter: RateLimiter, metrics: PrometheusMetrics) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.usage: UsageBook | None = None  # the usage ledger, with [admin]
        self._tasks: set[asyncio.Task[None]] = set()

    async def reserve(
        self,
        limits: Limits,
        *,
        shadow: bool = False,
        caller: Caller | None = None,
        model: str | None = None,
    ) -> Decision:
        """Check and take every limit of a request in one storage call; a storage that cannot
        answer (and no fallback) is a rejection with reason ``unavailable``. With the usage
        ledger on, a ``caller``'s rejection is counted by the same call."""
        started = time.perf_counter()
        book = self.usage if caller is not None and not shadow else None
        tally = None if book is None or caller is None else book.rejected(caller, model)
        apart = book is not None and caller is not None and book.apart(caller)
        try:
            decision = await self.limiter.hit_many(
                limits.hits,
                acquire=limits.acquire,
                shadow=shadow,
                rejected=None if apart else tally,
            )
            if apart and tally is not None and not decision.allowed:
                self.background(self._count(tally))
            return decision
        except StorageError as exc:
            logger.error("quotagate: storage error: %s", exc)
            return storage_error_decision()
        finally:
            self.metrics.decision_seconds(time.perf_counter() - started)

    async def undo(self, admission: Admission) -> None:
        """A request admitted but never served (backend full): give back all it took."""
        limits = admission.limits
        refunds = [_recharged(hit, -hit.cost) for hit in limits.requests]
        refunds += (_recharged(hit, -admission.reserved) for hit in limits.tokens)
        refunds += (_recharged(hit, -admission.money) for hit in limits.money)
        await self._settle(admission, refunds, "giving back a request")

    async def extend(self, admission: Admission, tokens: int) -> int:
        """Reserve ``tokens`` more output tokens for an answer that outgrew its reservation, on
        its token limits and budgets, in one call; refused, what they still allow, in one more.
        What was reserved (0: the answer ends where it is); settling reconciles it all."""
        price = admission.price
        limits = admission.limits
        for _ in range(2):
            money = price.cost(0, tokens) if price is not None and limits.money else 0
            hits = [_recharged(hit, tokens) for hit in limits.tokens]
            hits += (_recharged(hit, money) for hit in limits.money)
            try:
                decision = await self.limiter.hit_many(hits)
            except StorageError as exc:
                logger.error("quotagate: storage error while reserving more tokens: %s", exc)
                return 0
            if decision.allowed:
                admission.reserved += tokens
                admission.money += money
                self.metrics.tokens(admission.caller.tier.name, "reserved", tokens)
                return tokens
            tokens = min(tokens - 1, room(decision, price) or 0)  # taken by others meanwhile
            if tokens <= 0:
                break
        return 0

    async def settle(
        self,
        admission: Admission,
        used: Used | None,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Reconcile the reservation on the tokens ``used`` (None: not served, all given back),
        count it in the usage ledger and release the slot, in one call; ``before`` runs first
        (closing an upstream stream), in the same task that cannot be cancelled."""
        if self.limiter.in_process and before is None:  # nothing here can suspend
            await self._reconcile(admission, used, None)
            return
        await asyncio.shield(self.background(self._reconcile(admission, used, before)))

    def background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` to the end even if the request's task is cancelled; kept until done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for settlements still running (shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reconcile(
        self,
        admission: Admission,
        used: Used | None,
        before: Callable[[], Awaitable[None]] | None,
    ) -> None:
        if before is not None:
            await before()
        caller = admission.caller
        tier = caller.tier.name
        charged = 0 if used is None else used.total
        delta = charged - admission.reserved
        charges = [_recharged(hit, delta) for hit in admission.limits.tokens] if delta else []
        spent = admission.cost(used) - admission.money
        if spent:
            charges += (_recharged(hit, spent) for hit in admission.limits.money)
        book = self.usage
        tally = None
        if book is not None and used is not None:
            tally = book.served(caller, admission.model, used, admission.cost(used))
            if book.apart(caller):
                self.background(self._count(tally))
                tally = None
        await self._settle(admission, charges, "settling %+d tokens", delta, tally=tally)
        self.metrics.tokens(tier, "charged", charged)
        self.metrics.tokens(tier, "refunded", -delta)

    async def _count(self, tally: Tally) -> None:
        """A usage count in a call of its own (an anonymous tier on Redis Cluster)."""
        try:
            await self.limiter.settle([], None, tally)
        except StorageError as exc:
            logger.error("quotagate: storage error while counting usage: %s", exc)

    async def _settle(
        self,
        admission: Admission,
        charges: list[Hit],
        what: str,
        *args: object,
        tally: Tally | None = None,
    ) -> None:
        try:
            await self.limiter.settle(charges, admission.decision.lease, tally)
        except StorageError as exc:
            logger.error(
                f"quotagate: storage error while {what} (a held slot expires at its deadline): %s",
                *args,
                exc,
            )


def _recharged(hit: Hit, cost: int) -> Hit:
    """``hit`` at another cost (built directly: ``_replace`` is several times slower)."""
    return Hit(hit.key, hit.rates, cost, hit.algorithm, hit.name)

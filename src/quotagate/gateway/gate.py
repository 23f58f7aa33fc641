"""A backend's queue: one shared by its replicas, fair between clients and costed in tokens.

Each replica takes at most its ``limit`` requests at a time (``max_concurrency``, or what the
adaptive controller has found the model server can take); a request goes to the healthy replica
with the fewest in flight (ties in turn). When every replica is full the request waits, at most
the queue timeout, and each slot that frees on ANY replica goes to the next waiter in this order:

1. a request already admitted once and sent back (a failover, or a model server that said it
   was full), in arrival order;
2. with ``max_queue_wait_ms``, a request that has waited that long, whatever its priority
   (so a lower tier is never starved for ever);
3. the highest tier ``priority`` waiting, strictly; within one priority, weighted fair queuing
   over clients (``_Level``), costed in tokens (prompt estimate + reserved output): each client
   is served in proportion to its weight, FIFO within one, with the shares of weighted deficit
   round robin, in O(log n) per decision.

A client that queues 100 requests therefore cannot make another client of its priority wait
behind them: the other's next request is served within one round. Memory is bounded by
``max_queued`` per backend, and a waiter that times out or whose client goes away is removed at
once, its client's entry with it when it was the last.

With the adaptive controller on, the highest priority keeps ``headroom`` of every replica's limit
to itself: lower tiers are held back first, and a paying request finds a slot at once even while
free-tier traffic saturates the server. That is the one place a slot may stay idle while a
lower-tier request waits.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adaptive import Controller
    from .backends import Backend

__all__ = ["BackendUnavailable", "QueueFull", "Replica", "ReplicaGate", "Ticket"]


class BackendUnavailable(Exception):
    """No healthy replica can take the request (all down, removed, or already tried)."""


class QueueFull(Exception):
    """The backend's queue holds ``max_queued`` waiters already."""


class Replica:
    """One model server of a backend, as the gate and the health checks see it."""

    __slots__ = (
        "backend",
        "controller",
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
        self.controller: Controller | None = None  # with ``adaptive``: sets ``limit``

    @property
    def serving(self) -> bool:
        return self.up and not self.retired

    @property
    def limit(self) -> int:
        """Requests it may have in flight now."""
        controller = self.controller
        return self.max_concurrency if controller is None else controller.limit

    def room(self, top: bool) -> bool:
        """Whether it takes one more request; ``top``: of the highest priority, which may use
        the adaptive headroom the others leave free."""
        controller = self.controller
        if controller is None:
            return self.in_flight < self.max_concurrency
        return self.in_flight < (controller.limit if top else controller.below_top)


class Ticket:
    """What the queue knows of a request: its tier's priority, its client (an API key id, or
    an anonymous caller's address), its cost in tokens and its client's weight."""

    __slots__ = ("client", "cost", "priority", "weight")

    def __init__(
        self, priority: int = 0, client: str = "", cost: int = 1, weight: float = 1.0
    ) -> None:
        self.priority = priority
        self.client = client
        self.cost = max(1, cost)
        self.weight = weight


class _Waiter:
    __slots__ = ("exclude", "finish", "future", "queued", "seq", "since", "start", "ticket")

    def __init__(
        self,
        ticket: Ticket,
        exclude: Collection[Replica],
        future: asyncio.Future[Replica],
        seq: int,
        since: float,
    ) -> None:
        self.ticket = ticket
        self.exclude = exclude
        self.future = future
        self.seq = seq
        self.since = since
        self.queued = True
        self.start = self.finish = 0.0  # virtual times, within its priority (``_Level``)


class _Flow:
    """One client's place within one priority: its waiters, and the virtual time its last one
    finishes (where its next one starts)."""

    __slots__ = ("finish", "served", "waiting")

    def __init__(self) -> None:
        self.finish = 0.0
        self.served = 0.0  # the finish of its last waiter served
        self.waiting = 0


class _Level:
    """One priority's waiters: weighted start-time fair queuing over clients, FIFO within one.

    Each waiter gets a start tag, ``max(vtime, its client's finish)``, and moves its client's
    finish on by ``cost / weight``; the lowest start is served next (arrival breaks ties) and
    ``vtime`` becomes its start. A client that keeps requests waiting is served in proportion to
    its weight, in tokens; one that comes back the moment its last was served keeps its place
    (its finish is ahead of ``vtime``), which plain round robin loses when a queue empties for
    an instant; one that was away starts at ``vtime``, with no credit saved up. The same shares
    as weighted deficit round robin, in O(log n) per decision.
    """

    __slots__ = ("by_age", "flows", "heap", "idle", "vtime")

    def __init__(self) -> None:
        self.flows: dict[str, _Flow] = {}
        self.heap: list[tuple[float, int, _Waiter]] = []  # (start, seq): served ones linger
        self.by_age: OrderedDict[int, _Waiter] = OrderedDict()
        self.idle: list[tuple[float, str]] = []  # (finish, client) of flows left with none
        self.vtime = 0.0

    def __len__(self) -> int:
        return len(self.by_age)

    def add(self, waiter: _Waiter) -> None:
        ticket = waiter.ticket
        flow = self.flows.get(ticket.client)
        if flow is None:
            flow = self.flows[ticket.client] = _Flow()
        waiter.start = max(self.vtime, flow.finish)
        flow.finish = waiter.finish = waiter.start + ticket.cost / ticket.weight
        flow.waiting += 1
        heapq.heappush(self.heap, (waiter.start, waiter.seq, waiter))
        self.by_age[waiter.seq] = waiter

    def next(self) -> _Waiter:
        """The waiter served next (not taken yet)."""
        heap = self.heap
        while not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][2]

    def remove(self, waiter: _Waiter, *, served: bool) -> None:
        """Take ``waiter`` out; ``served`` moves virtual time to its start. A client whose
        waiters all left unserved (timed out, went away) is where its last served one put it."""
        client = waiter.ticket.client
        flow = self.flows[client]
        del self.by_age[waiter.seq]
        flow.waiting -= 1
        if served:
            self.vtime = max(self.vtime, waiter.start)
            flow.served = waiter.finish
        if not flow.waiting:
            flow.finish = flow.served
            if flow.finish <= self.vtime:
                del self.flows[client]
            else:
                heapq.heappush(self.idle, (flow.finish, client))
        self._forget()

    def _forget(self) -> None:
        """Drop what no longer counts: clients with none waiting whose place virtual time has
        passed, and the heap entries of waiters gone (once they outnumber the live ones)."""
        idle, flows, vtime = self.idle, self.flows, self.vtime
        while idle and idle[0][0] <= vtime:
            _, client = heapq.heappop(idle)
            flow = flows.get(client)
            if flow is not None and not flow.waiting and flow.finish <= vtime:
                del flows[client]
        if len(self.heap) > 2 * len(self.by_age) + 64:
            self.heap = [entry for entry in self.heap if entry[2].queued]
            heapq.heapify(self.heap)

    def oldest(self) -> _Waiter:
        return next(iter(self.by_age.values()))


class ReplicaGate:
    """Slots on ``replicas`` (the list is the pool's own: a reload changes it in place).

    ``max_queued``: waiters at most; ``max_wait``: seconds after which a waiter is served
    before any priority (None: never); ``top``: the highest priority of the config's tiers.
    """

    def __init__(
        self,
        replicas: list[Replica],
        *,
        max_queued: int = 1000,
        max_wait: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = replicas
        self.max_queued = max_queued
        self.max_wait = max_wait
        self.top = 0
        self.clock = clock
        self._levels: dict[int, _Level] = {}
        self._again: OrderedDict[int, _Waiter] = OrderedDict()  # sent back: served first
        self._seq = 0
        self._turn = 0
        self._queued = 0
        self.drain = DrainRate(clock)

    @property
    def in_flight(self) -> int:
        return sum(replica.in_flight for replica in self.replicas)

    @property
    def max_concurrency(self) -> int:
        return sum(replica.limit for replica in self.replicas if replica.serving)

    @property
    def free(self) -> int:
        return sum(max(0, r.limit - r.in_flight) for r in self.replicas if r.serving)

    @property
    def queued(self) -> int:
        return self._queued

    def clients(self) -> int:
        """Clients with a request waiting (a test's view of what the queue holds)."""
        waiting = (f for level in self._levels.values() for f in level.flows.values() if f.waiting)
        return sum(1 for _ in waiting) + len(self._again)

    def healthy(self, exclude: Collection[Replica] = ()) -> bool:
        return any(r.serving and r not in exclude for r in self.replicas)

    async def acquire(
        self,
        ticket: Ticket | int,
        wait: float,
        exclude: Collection[Replica] = (),
        *,
        again: bool = False,
    ) -> Replica | None:
        """A replica with a slot taken on it, waiting up to ``wait`` seconds; None when none
        came in time. ``ticket``: the request (a bare int is a priority, one anonymous client);
        ``again``: sent back by a full server (served ahead of the queue, as is a failover,
        one with ``exclude``).

        Raises:
            BackendUnavailable: no healthy replica (outside ``exclude``) to wait for.
            QueueFull: ``max_queued`` are waiting already.
        """
        if not isinstance(ticket, Ticket):
            ticket = Ticket(ticket)
        top = ticket.priority >= self.top
        # Sent back by a full server: straight to another replica with room, else the head of
        # the queue, to wait for a slot that frees (not the one that was just refused). A new
        # request takes a slot at once unless someone it must not pass waits: a free slot that
        # the queue has not taken is one no waiter could (the headroom of the highest priority).
        if (not again and not self._ahead(ticket.priority)) or exclude:
            replica = self._pick(exclude, top)
            if replica is not None:
                replica.in_flight += 1
                return replica
        if not self.healthy(exclude):
            raise BackendUnavailable
        if self._queued >= self.max_queued and not again:
            raise QueueFull
        future: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._seq += 1
        waiter = _Waiter(ticket, exclude, future, self._seq, self.clock())
        if again or exclude:  # admitted before (a failover, or a full server's): ahead
            self._again[waiter.seq] = waiter
        else:
            level = self._levels.get(ticket.priority)
            if level is None:
                level = self._levels[ticket.priority] = _Level()
            level.add(waiter)
        self._queued += 1
        try:
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            self._abandon(waiter)
            return None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _ahead(self, priority: int) -> bool:
        """Whether a waiter would be served before a new request of ``priority``."""
        return bool(self._again) or any(p >= priority for p in self._levels)

    def release(self, replica: Replica) -> None:
        """Give a slot back; a waiter takes it (or another replica's, if it excluded this one)."""
        replica.in_flight -= 1
        self.drain.tick()
        if self._queued:
            self._serve()  # health is as it was: no waiter is stranded by a freed slot

    def redispatch_after(self, delay: float) -> None:
        """Run ``dispatch`` in ``delay`` seconds: a request sent back by a full server is
        tried again then, if no slot freed before (backing off)."""
        asyncio.get_running_loop().call_later(delay, self._serve)

    def dispatch(self) -> None:
        """Hand free slots to waiters in the queue's order; fail the waiters no healthy replica
        is left for. Run when replicas come and go or capacity changes."""
        self._fail_stranded()
        self._serve()

    def _serve(self) -> None:
        """Hand free slots to waiters in the queue's order."""
        while self._queued:
            waiter = self._next_again()
            if waiter is None:
                waiter = self._next_waiting()
                if waiter is None:
                    return
            replica = self._pick(waiter.exclude, waiter.ticket.priority >= self.top)
            if replica is None:
                return  # full for this waiter, so for every waiter after it
            self._take(waiter, served=True)
            replica.in_flight += 1
            waiter.future.set_result(replica)

    def _next_again(self) -> _Waiter | None:
        """The first sent-back waiter a replica has room for (others may exclude it)."""
        for waiter in self._again.values():
            top = waiter.ticket.priority >= self.top
            if self._pick(waiter.exclude, top, turn=False) is not None:
                return waiter
        return None

    def _next_waiting(self) -> _Waiter | None:
        levels = self._levels
        if not levels:
            return None
        highest = max(levels)
        if self.max_wait is not None and len(levels) > 1:
            due = self.clock() - self.max_wait
            aged = [lv.oldest() for p, lv in levels.items() if p != highest]
            oldest = min(aged, key=lambda w: w.seq)
            if oldest.since <= due:
                return oldest
        return levels[highest].next()

    def _take(self, waiter: _Waiter, *, served: bool) -> None:
        waiter.queued = False
        self._queued -= 1
        if self._again.pop(waiter.seq, None) is not None:
            return
        priority = waiter.ticket.priority
        level = self._levels[priority]
        level.remove(waiter, served=served)
        if not len(level):
            del self._levels[priority]

    def _fail_stranded(self) -> None:
        """Waiters with no healthy replica left to wait for are answered now."""
        if self.healthy():
            stranded = [w for w in self._again.values() if not self.healthy(w.exclude)]
        else:
            stranded = [*self._again.values()]
            stranded += (w for level in self._levels.values() for w in level.by_age.values())
        for waiter in stranded:
            self._take(waiter, served=False)
            waiter.future.set_exception(BackendUnavailable())

    def _pick(self, exclude: Collection[Replica], top: bool, turn: bool = True) -> Replica | None:
        """The healthy replica with room and the fewest in flight; ties go round in turn."""
        replicas = self.replicas
        count = len(replicas)
        if count == 1:
            only = replicas[0]
            fits = only.serving and only.room(top)
            return only if fits and only not in exclude else None
        best: Replica | None = None
        if turn:
            self._turn += 1
        for i in range(count):
            replica = replicas[(self._turn + i) % count]
            if (
                replica.serving
                and replica.room(top)
                and replica not in exclude
                and (best is None or replica.in_flight < best.in_flight)
            ):
                best = replica
        return best

    def _abandon(self, waiter: _Waiter) -> None:
        future = waiter.future
        if waiter.queued:
            self._take(waiter, served=False)
            future.cancel()
        elif future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())  # the slot arrived just as we gave up: pass it on

    def retry_after(self, ahead: int | None = None) -> int:
        """Seconds until a request joining now would likely be served: the waiters ahead of it
        over how fast slots have been freeing (at least 1)."""
        ahead = self._queued if ahead is None else ahead
        rate = self.drain.per_second()
        if rate <= 0:
            return 1
        return max(1, min(3600, math.ceil((ahead + 1) / rate)))


class DrainRate:
    """Slots freed per second, as a moving average over about ``window`` seconds."""

    __slots__ = ("_clock", "_count", "_rate", "_since", "window")

    def __init__(self, clock: Callable[[], float], window: float = 10.0) -> None:
        self._clock = clock
        self.window = window
        self._since = clock()
        self._count = 0
        self._rate = 0.0

    def tick(self) -> None:
        self._count += 1
        self._roll()

    def _roll(self) -> None:
        now = self._clock()
        elapsed = now - self._since
        if elapsed >= 1.0:  # fold whole seconds in: an exponential average per second
            share = min(1.0, elapsed / self.window) if self._rate else 1.0
            self._rate += share * (self._count / elapsed - self._rate)
            self._since, self._count = now, 0

    def per_second(self) -> float:
        self._roll()
        return self._rate

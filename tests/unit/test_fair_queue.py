"""A backend's queue within one priority: weighted fair queuing over clients, costed in tokens,
FIFO within a client; aging, bounds, and nothing left behind by a waiter that leaves."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from quotagate.gateway.adaptive import Controller
from quotagate.gateway.gate import QueueFull, Replica, ReplicaGate, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def one_replica(limit: int = 1) -> list[Replica]:
    return [Replica(cast(Any, None), "http://r0/v1", "r0", limit)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue(gate: ReplicaGate, tickets: list[Ticket]) -> list[asyncio.Future[Any]]:
    """Queue ``tickets`` in order (each waits long); the gate's one slot is already taken."""
    waiting: list[asyncio.Future[Any]] = []
    for ticket in tickets:
        waiting.append(asyncio.ensure_future(gate.acquire(ticket, 60)))
        await settle()
    return waiting


async def serve_order(
    gate: ReplicaGate, replica: Replica, waiting: list[asyncio.Future[Any]], count: int
) -> list[int]:
    """Free the slot ``count`` times; the index of the waiter served each time."""
    order: list[int] = []
    before = {i for i, w in enumerate(waiting) if w.done()}
    for _ in range(count):
        gate.release(replica)
        await settle()
        done = [i for i, w in enumerate(waiting) if w.done() and i not in before and i not in order]
        assert len(done) == 1
        order.append(done[0])
    return order


async def test_a_flooder_cannot_make_another_client_wait_behind_all_of_it() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    held = await gate.acquire(Ticket(0, "flood"), 0)
    assert held is pool[0]
    waiting = await queue(gate, [Ticket(0, "flood", 100) for _ in range(100)])
    waiting += await queue(gate, [Ticket(0, "calm", 100)])
    order = await serve_order(gate, pool[0], waiting, 3)
    assert 100 in order[:2]  # the calm client's one request: within one round, not the 101st
    for w in waiting:
        w.cancel()


async def test_equal_weights_alternate_and_each_client_is_fifo() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "a"), 0)
    tickets = [Ticket(0, "a", 10) for _ in range(4)] + [Ticket(0, "b", 10) for _ in range(4)]
    waiting = await queue(gate, tickets)
    order = await serve_order(gate, pool[0], waiting, 8)
    clients = ["a" if i < 4 else "b" for i in order]
    assert clients == ["a", "b"] * 4
    assert [i for i in order if i < 4] == [0, 1, 2, 3]  # FIFO within a client
    assert [i for i in order if i >= 4] == [4, 5, 6, 7]


async def test_weights_three_to_one_serve_three_to_one() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    heavy = [Ticket(0, "gold", 10, weight=3) for _ in range(30)]
    light = [Ticket(0, "tin", 10, weight=1) for _ in range(30)]
    waiting = await queue(gate, heavy + light)
    order = await serve_order(gate, pool[0], waiting, 40)
    gold = sum(1 for i in order if i < 30)
    assert gold == 30  # 3 of every 4 for 40 slots, exactly
    for w in waiting:
        w.cancel()


async def test_a_client_that_sends_again_as_soon_as_served_keeps_its_weighted_share() -> None:
    """A client with one request at a time (its next sent as soon as the last is served) gets
    its weight's share against a client with many queued: its queue empties for an instant
    after every turn, and that must not cost it its place."""
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "tin", 10) for _ in range(40)])
    gold: list[asyncio.Future[Any]] = []

    async def send_gold() -> None:
        gold.append(asyncio.ensure_future(gate.acquire(Ticket(0, "gold", 10, weight=3), 60)))
        await settle()

    await send_gold()
    served_gold = 0
    for _ in range(40):
        gate.release(pool[0])
        await settle()
        if gold[-1].done():
            served_gold += 1
            await send_gold()
    assert served_gold == 30  # 3 of every 4, as with both always queued
    for w in [*waiting, *gold]:
        w.cancel()


async def test_a_client_whose_requests_all_timed_out_is_not_set_back() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "busy", 10) for _ in range(20)])
    late = [asyncio.ensure_future(gate.acquire(Ticket(0, "late", 10), 0.01)) for _ in range(10)]
    assert await asyncio.gather(*late) == [None] * 10
    await serve_order(gate, pool[0], waiting, 2)
    # Back after its ten timed out: served next, not behind ten turns it never had.
    waiting += await queue(gate, [Ticket(0, "late", 10)])
    assert await serve_order(gate, pool[0], waiting, 2) in ([20, 2], [2, 20])
    for w in waiting:
        w.cancel()


async def test_shares_are_by_tokens_not_requests() -> None:
    """A client of 20000-token requests and one of 200-token requests, equal weights: each gets
    the same tokens, so the small one gets 100 requests for each big one."""
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    big = [Ticket(0, "big", 20_000) for _ in range(5)]
    small = [Ticket(0, "small", 200) for _ in range(400)]
    waiting = await queue(gate, big + small)
    order = await serve_order(gate, pool[0], waiting, 303)
    big_tokens = 20_000 * sum(1 for i in order if i < 5)
    small_tokens = 200 * sum(1 for i in order if i >= 5)
    assert big_tokens == 60_000  # 3 big ones in 303 slots
    assert small_tokens == 60_000  # 300 small ones
    for w in waiting:
        w.cancel()


async def test_weights_below_one_are_served_in_proportion_without_spinning() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(
        gate,
        [Ticket(0, "a", 100, weight=0.01) for _ in range(6)]
        + [Ticket(0, "b", 100, weight=0.02) for _ in range(6)],
    )
    order = await serve_order(gate, pool[0], waiting, 9)
    assert sum(1 for i in order if i >= 6) == 6  # b: twice a's share while both wait
    for w in waiting:
        w.cancel()


async def test_the_highest_priority_takes_its_headroom_at_once_past_lower_waiters() -> None:
    """Lower tiers fill all they may (the limit less its headroom) and more of them wait: a
    request of the highest priority takes the headroom's slot on arrival, not when one of
    theirs next finishes."""
    pool = one_replica(10)
    pool[0].controller = Controller(min_concurrency=10, max_concurrency=10, headroom=0.1)
    gate = ReplicaGate(pool)
    gate.top = 10
    held = [await gate.acquire(Ticket(1, "free"), 0) for _ in range(9)]
    assert all(r is pool[0] for r in held)
    waiting = await queue(gate, [Ticket(1, "free") for _ in range(5)])
    assert gate.queued == 5  # 9 of 10: the lower tiers' share is full
    assert await gate.acquire(Ticket(10, "pro"), 0) is pool[0]  # no wait at all
    assert gate.queued == 5
    for w in waiting:
        w.cancel()


async def test_priority_stays_strict_over_fairness() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "free", 1) for _ in range(3)])
    waiting += await queue(gate, [Ticket(10, "pro", 1000) for _ in range(2)])
    order = await serve_order(gate, pool[0], waiting, 5)
    assert order[:2] == [3, 4]


async def test_a_long_wait_moves_up_when_max_queue_wait_is_set() -> None:
    clock = Clock()
    pool = one_replica()
    gate = ReplicaGate(pool, max_wait=1.0, clock=clock)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "free")])
    clock.now += 0.5
    waiting += await queue(gate, [Ticket(10, "pro") for _ in range(3)])
    assert await serve_order(gate, pool[0], waiting, 1) == [1]  # 0.5 s: priority first
    clock.now += 0.6  # the free request has waited 1.1 s
    assert await serve_order(gate, pool[0], waiting, 1) == [0]
    assert await serve_order(gate, pool[0], waiting, 2) == [2, 3]


async def test_without_max_queue_wait_a_lower_priority_waits_for_every_higher() -> None:
    clock = Clock()
    pool = one_replica()
    gate = ReplicaGate(pool, clock=clock)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "free")])
    waiting += await queue(gate, [Ticket(10, "pro") for _ in range(2)])
    clock.now += 3600
    assert await serve_order(gate, pool[0], waiting, 3) == [1, 2, 0]


async def test_waiters_that_time_out_or_go_away_leave_nothing_behind() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool)
    held = await gate.acquire(Ticket(0, "x"), 0)
    assert held is not None
    gone = [asyncio.ensure_future(gate.acquire(Ticket(0, f"c{i % 7}", 50), 60)) for i in range(50)]
    timing_out = [asyncio.ensure_future(gate.acquire(Ticket(5, "t"), 0.01)) for _ in range(5)]
    await settle()
    assert gate.queued == 55
    assert gate.clients() == 8
    for w in gone:
        w.cancel()
    assert await asyncio.gather(*timing_out) == [None] * 5
    await settle()
    assert gate.queued == 0
    assert gate.clients() == 0
    assert not gate._levels  # every priority's entry went with its last waiter
    gate.release(held)
    assert pool[0].in_flight == 0
    # A client that comes back starts afresh: no credit or debt kept from before.
    assert await gate.acquire(Ticket(0, "c1"), 0) is pool[0]


async def test_the_queue_is_bounded_by_max_queued() -> None:
    pool = one_replica()
    gate = ReplicaGate(pool, max_queued=2)
    await gate.acquire(Ticket(0, "x"), 0)
    waiting = await queue(gate, [Ticket(0, "a"), Ticket(0, "b")])
    with pytest.raises(QueueFull):
        await gate.acquire(Ticket(0, "c"), 60)
    for w in waiting:
        w.cancel()


async def test_work_conserving_every_free_slot_is_taken_while_someone_waits() -> None:
    pool = [Replica(cast(Any, None), f"http://r{i}/v1", f"r{i}", 2) for i in range(2)]
    gate = ReplicaGate(pool)
    held = [await gate.acquire(Ticket(0, "x"), 0) for _ in range(4)]
    waiting = await queue(gate, [Ticket(0, f"c{i % 3}", 10 * (i + 1)) for i in range(6)])
    for replica in held:
        assert replica is not None
        gate.release(replica)
    await settle()
    assert sum(1 for w in waiting if w.done()) == 4
    assert gate.free == 0
    for w in waiting:
        w.cancel()


async def test_retry_after_follows_how_fast_the_queue_drains() -> None:
    clock = Clock()
    pool = one_replica(limit=10)
    gate = ReplicaGate(pool, clock=clock)
    assert gate.retry_after() == 1  # nothing drained yet: no figure to go by
    taken = [await gate.acquire(Ticket(0, "x"), 0) for _ in range(10)]
    for replica in taken[:4]:  # 4 slots freed in 2 s: 2 a second
        assert replica is not None
        gate.release(replica)
    clock.now += 2.0
    assert gate.drain.per_second() == pytest.approx(2.0)
    assert gate.retry_after(ahead=9) == 5  # 10 to go at 2 a second
    assert gate.retry_after(ahead=0) == 1

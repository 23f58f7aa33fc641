"""A backend's queue over its replicas: least in flight, ties in turn, one queue in priority
order, failover exclusions, and waiters answered when no healthy replica is left."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from quotagate.gateway.gate import BackendUnavailable, Replica, ReplicaGate


def replicas(*limits: int) -> list[Replica]:
    return [Replica(cast(Any, None), f"http://r{i}/v1", f"r{i}", n) for i, n in enumerate(limits)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fewest_in_flight_first_and_ties_in_turn() -> None:
    pool = replicas(4, 4, 4)
    gate = ReplicaGate(pool)
    first = [await gate.acquire(0, 0) for _ in range(3)]
    assert sorted(r.label for r in first if r) == ["r0", "r1", "r2"]  # a tie each time: in turn
    assert first[0] is not None
    gate.release(first[0])
    assert await gate.acquire(0, 0) is first[0]  # the only one with fewer in flight


async def test_a_full_replica_is_skipped_and_a_full_backend_queues() -> None:
    pool = replicas(1, 2)
    gate = ReplicaGate(pool)
    taken = [await gate.acquire(0, 0) for _ in range(3)]
    assert [r.in_flight for r in pool] == [1, 2]
    assert await gate.acquire(0, 0) is None  # full: waited 0 s
    waiting = asyncio.ensure_future(gate.acquire(0, 10))
    await settle()
    assert gate.queued == 1
    assert taken[2] is not None
    gate.release(taken[2])
    assert await waiting is taken[2]


async def test_the_head_of_the_queue_takes_the_first_slot_on_any_replica() -> None:
    pool = replicas(1, 1)
    gate = ReplicaGate(pool)
    a, b = await gate.acquire(0, 0), await gate.acquire(0, 0)
    low = asyncio.ensure_future(gate.acquire(1, 10))
    await settle()
    high = asyncio.ensure_future(gate.acquire(10, 10))
    await settle()
    assert b is not None
    gate.release(b)
    assert await high is b
    assert a is not None
    gate.release(a)
    assert await low is a


async def test_a_failover_waits_only_for_replicas_it_has_not_tried() -> None:
    """The head excludes the replica whose slot frees: the next waiter takes it, and the head
    takes the next slot elsewhere."""
    pool = replicas(1, 1)
    gate = ReplicaGate(pool)
    a, b = await gate.acquire(0, 0), await gate.acquire(0, 0)
    assert a is not None
    assert b is not None
    retry = asyncio.ensure_future(gate.acquire(10, 10, exclude=(a,)))
    await settle()
    plain = asyncio.ensure_future(gate.acquire(0, 10))
    await settle()
    gate.release(a)
    assert await plain is a
    assert not retry.done()
    gate.release(b)
    assert await retry is b


async def test_no_healthy_replica_fails_now_and_fails_the_waiters() -> None:
    pool = replicas(1, 1)
    gate = ReplicaGate(pool)
    await gate.acquire(0, 0)
    await gate.acquire(0, 0)
    waiting = asyncio.ensure_future(gate.acquire(0, 10))
    await settle()
    for replica in pool:
        replica.up = False
    gate.dispatch()
    with pytest.raises(BackendUnavailable):
        await waiting
    with pytest.raises(BackendUnavailable):
        await gate.acquire(0, 10)
    pool[0].up = True
    with pytest.raises(BackendUnavailable):
        await gate.acquire(0, 10, exclude=(pool[0],))  # the only healthy one was tried


async def test_a_waiter_that_gives_up_as_its_slot_arrives_passes_it_on() -> None:
    pool = replicas(1)
    gate = ReplicaGate(pool)
    held = await gate.acquire(0, 0)
    assert held is not None
    leaving = asyncio.ensure_future(gate.acquire(0, 10))
    staying = asyncio.ensure_future(gate.acquire(0, 10))
    await settle()
    gate.release(held)  # the slot goes to ``leaving``...
    leaving.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await staying is held
    assert held.in_flight == 1

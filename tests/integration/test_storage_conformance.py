"""The storage conformance suite: every backend, same fake clock, same answers."""

from __future__ import annotations

import math

import pytest

import quotagate as qg

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def limiter(storage: qg.Storage) -> qg.RateLimiter:
    # The over-limit cache is an engine optimisation; here the storage itself must answer.
    return qg.RateLimiter(storage, overlimit_cache=False)


async def test_full_bucket_admits_capacity_then_one_per_interval(
    limiter: qg.RateLimiter, clock: qg.FakeClock
) -> None:
    for i in range(10):
        decision = await limiter.hit("client-a", "10/minute")
        assert decision.allowed, i
        assert decision.remaining == 9 - i
    eleventh = await limiter.hit("client-a", "10/minute")
    assert not eleventh.allowed
    assert eleventh.reason == "limited"
    assert eleventh.retry_after == pytest.approx(6.0)
    assert eleventh.remaining == 0
    clock.advance(5.9)
    assert not (await limiter.hit("client-a", "10/minute")).allowed
    clock.advance(0.1)
    after = await limiter.hit("client-a", "10/minute")
    assert after.allowed
    assert after.remaining == 0
    assert not (await limiter.hit("client-a", "10/minute")).allowed


async def test_reset_after_is_time_until_full(limiter: qg.RateLimiter, clock: qg.FakeClock) -> None:
    for _ in range(3):
        decision = await limiter.hit("k", "10/minute")
    assert decision.reset_after == pytest.approx(18.0)
    clock.advance(18.0)
    assert (await limiter.hit("k", "10/minute", cost=0)).remaining == 10


async def test_keys_are_independent(limiter: qg.RateLimiter) -> None:
    for _ in range(2):
        assert (await limiter.hit("alice", "2/minute")).allowed
    assert not (await limiter.hit("alice", "2/minute")).allowed
    assert (await limiter.hit("bob", "2/minute")).allowed


async def test_all_or_nothing_across_hits(limiter: qg.RateLimiter) -> None:
    hits = [qg.Hit("{c}:req", "100/minute"), qg.Hit("{c}:tok", "1000/minute", cost=600)]
    assert (await limiter.hit_many(hits)).allowed
    rejected = await limiter.hit_many(hits)  # tokens: 400 left < 600
    assert not rejected.allowed
    # Neither limit was consumed by the rejected call.
    req = await limiter.hit("{c}:req", "100/minute", cost=0)
    tok = await limiter.hit("{c}:tok", "1000/minute", cost=0)
    assert req.remaining == 99
    assert tok.remaining == 400
    # The most restrictive limit of a rejection is the one that forced the wait.
    assert rejected.limit == 1000
    assert rejected.retry_after == pytest.approx(200 * 0.06)


async def test_several_rates_in_one_hit(limiter: qg.RateLimiter, clock: qg.FakeClock) -> None:
    for _ in range(3):
        assert (await limiter.hit("k", "10/second; 3/hour")).allowed
    decision = await limiter.hit("k", "10/second; 3/hour")
    assert not decision.allowed
    assert decision.limit == 3
    assert decision.retry_after == pytest.approx(1200.0)
    assert [s.rate for s in decision.states] == list(qg.parse_rates("10/second; 3/hour"))
    clock.advance(1200)
    assert (await limiter.hit("k", "10/second; 3/hour")).allowed


async def test_most_restrictive_on_admission(limiter: qg.RateLimiter) -> None:
    decision = await limiter.hit_many(
        [qg.Hit("{c}:req", "60/minute; 1000/day"), qg.Hit("{c}:tok", "1000/minute", cost=500)]
    )
    assert decision.allowed
    assert (decision.limit, decision.remaining) == (1000, 500)
    assert decision.reset_after == pytest.approx(30.0)


async def test_cost_above_capacity_is_too_large(limiter: qg.RateLimiter) -> None:
    decision = await limiter.hit("k", "1000/minute", cost=1001)
    assert not decision.allowed
    assert decision.reason == "too_large"
    assert decision.retry_after == math.inf
    assert (await limiter.hit("k", "1000/minute", cost=1000)).allowed


async def test_adjust_charge_is_not_clamped(limiter: qg.RateLimiter) -> None:
    await limiter.adjust("k", "10/minute", delta=20)
    decision = await limiter.hit("k", "10/minute")
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(66.0)


async def test_adjust_refund_stops_at_full(limiter: qg.RateLimiter) -> None:
    for _ in range(10):
        await limiter.hit("k", "10/minute")
    states = await limiter.adjust("k", "10/minute", delta=-4)
    assert states[0].remaining == 4
    await limiter.adjust("k", "10/minute", delta=-100)
    for i in range(10):
        assert (await limiter.hit("k", "10/minute")).allowed, i
    assert not (await limiter.hit("k", "10/minute")).allowed


async def test_token_reservation_then_reconcile(limiter: qg.RateLimiter) -> None:
    reserved = await limiter.hit("{a}:tok", "1000/minute", cost=700)
    assert reserved.remaining == 300
    states = await limiter.adjust("{a}:tok", "1000/minute", delta=-500)  # used 200 of 700
    assert states[0].remaining == 800


async def test_fixed_window_is_aligned_to_the_period(
    limiter: qg.RateLimiter, clock: qg.FakeClock
) -> None:
    clock.now = 1_800_000_000.0 + 30  # 1_800_000_000 is a multiple of 60
    for _ in range(5):
        assert (await limiter.hit("k", "5/minute", algorithm="fixed_window")).allowed
    decision = await limiter.hit("k", "5/minute", algorithm="fixed_window")
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(30.0)
    assert decision.reset_after == pytest.approx(30.0)
    clock.advance(30)
    decision = await limiter.hit("k", "5/minute", algorithm="fixed_window")
    assert decision.allowed
    assert decision.remaining == 4
    assert decision.reset_after == pytest.approx(60.0)


async def test_fixed_window_refund(limiter: qg.RateLimiter) -> None:
    await limiter.hit("k", "5/minute", cost=5, algorithm="fixed_window")
    states = await limiter.adjust("k", "5/minute", delta=-2, algorithm="fixed_window")
    assert states[0].remaining == 2
    states = await limiter.adjust("k", "5/minute", delta=-9, algorithm="fixed_window")
    assert states[0].remaining == 5


async def test_gcra_and_fixed_window_state_do_not_collide(limiter: qg.RateLimiter) -> None:
    await limiter.hit("k", "2/minute", cost=2)
    assert (await limiter.hit("k", "2/minute", algorithm="fixed_window", cost=2)).allowed


async def test_concurrency_leases(limiter: qg.RateLimiter, clock: qg.FakeClock) -> None:
    first = await limiter.acquire("{a}:conc", limit=2, ttl=600)
    second = await limiter.acquire("{a}:conc", limit=2, ttl=600)
    assert first is not None
    assert second is not None
    assert first.id != second.id
    assert await limiter.acquire("{a}:conc", limit=2, ttl=600) is None
    await limiter.release(first)
    await limiter.release(first)  # idempotent
    assert await limiter.acquire("{a}:conc", limit=2, ttl=600) is not None


async def test_leases_expire_when_never_released(
    limiter: qg.RateLimiter, clock: qg.FakeClock
) -> None:
    assert await limiter.acquire("{a}:conc", limit=1, ttl=30) is not None
    assert await limiter.acquire("{a}:conc", limit=1, ttl=30) is None
    clock.advance(30)  # the holder crashed: its lease is past its deadline
    assert await limiter.acquire("{a}:conc", limit=1, ttl=30) is not None


async def test_lease_joins_the_decision_all_or_nothing(limiter: qg.RateLimiter) -> None:
    hits = [qg.Hit("{a}:req", "10/minute")]
    held = await limiter.hit_many(hits, acquire=qg.Acquire("{a}:conc", 1, ttl=60))
    assert held.allowed
    assert held.lease is not None
    busy = await limiter.hit_many(hits, acquire=qg.Acquire("{a}:conc", 1, ttl=60))
    assert not busy.allowed
    assert busy.lease is None
    assert busy.retry_after > 0
    # Rejected for concurrency: the request was not charged.
    assert (await limiter.hit("{a}:req", "10/minute", cost=0)).remaining == 9
    # Rejected for rate: no slot taken.
    await limiter.release(held.lease)
    await limiter.hit("{a}:req", "10/minute", cost=9)
    over = await limiter.hit_many(hits, acquire=qg.Acquire("{a}:conc", 1, ttl=60))
    assert not over.allowed
    assert over.lease is None
    assert await limiter.acquire("{a}:conc", 1, ttl=60) is not None


async def test_zero_cost_reads_without_consuming(limiter: qg.RateLimiter) -> None:
    for _ in range(3):
        peek = await limiter.hit("k", "10/minute", cost=0)
        assert peek.allowed
        assert peek.remaining == 10


async def test_hash_tags_are_kept(limiter: qg.RateLimiter) -> None:
    decision = await limiter.hit_many(
        [qg.Hit("{client-a}:req", "1/minute"), qg.Hit("plain", "1/minute")]
    )
    assert [s.key for s in decision.states] == ["{client-a}:req:60s", "{plain}:60s"]


async def test_a_zero_ttl_acquire_reads_free_slots(limiter: qg.RateLimiter) -> None:
    held = await limiter.acquire("{a}:conc", limit=3, ttl=60)
    assert held is not None
    peek = await limiter.hit_many((), acquire=qg.Acquire("{a}:conc", 3, ttl=0))
    assert peek.lease is None
    assert peek.states[0].remaining == 2
    assert (await limiter.hit_many((), acquire=qg.Acquire("{a}:conc", 3, ttl=0))).remaining == 2


async def test_reset_forgets_every_state(limiter: qg.RateLimiter) -> None:
    hits = [qg.Hit("{a}:req", "2/day"), qg.Hit("{b}:req", "2/day", algorithm="fixed_window")]
    for _ in range(2):
        assert (await limiter.hit_many(hits)).allowed
    lease = await limiter.acquire("{a}:conc", 1)
    assert lease is not None
    assert not (await limiter.hit_many(hits)).allowed
    assert await limiter.acquire("{a}:conc", 1) is None

    assert await limiter.reset() == 3  # two limits' states and the lease set
    assert (await limiter.hit_many(hits)).remaining == 1  # full again, less this hit
    assert await limiter.acquire("{a}:conc", 1) is not None
    await limiter.release(lease)  # a lease from before the reset: a no-op
    assert await limiter.acquire("{a}:conc", 1) is None  # the new holder still holds it
    assert await limiter.reset() == 3
    assert await limiter.reset() == 0

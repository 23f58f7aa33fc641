"""The p95 an estimate tier reserves: per client and model, then per tier, in bounded memory;
shared through a storage as histograms whose p95 is never below the answers they count."""

from __future__ import annotations

import random

import pytest

import quotagate as qg
from quotagate.gateway.estimates import GENERATION_S, Estimates, bucket, p95_of
from quotagate.limiter import RateLimiter


def test_buckets_are_exact_to_64_tokens_then_within_a_32nd_rounded_up() -> None:
    assert [bucket(n) for n in (0, 1, 63, 64)] == [0, 1, 63, 64]
    assert bucket(200) == 200  # a multiple of 4, its bucket's width
    assert bucket(201) == 204
    assert bucket(1000) == 1008
    for n in range(1, 100_000, 37):
        assert n <= bucket(n) <= n + n / 32


def test_the_clients_p95_then_its_tiers_then_none() -> None:
    estimates = Estimates(window=100)
    assert estimates.p95("key:a", "free", "m") is None
    for tokens in range(1, 101):  # 1..100: the 95th is 96 (rank 95 of 0..99)
        estimates.add("key:a", "free", "m", tokens)
    assert estimates.p95("key:a", "free", "m") == 96
    assert estimates.p95("key:b", "free", "m") == 96  # no history: the tier's
    assert estimates.p95("key:a", "free", "other") is None


def test_memory_is_bounded_by_entries_and_by_the_window() -> None:
    estimates = Estimates(window=4, size=10)
    for tokens in (1000, 1000, 1000, 1000, 5):
        estimates.add("key:a", "free", "m", tokens)
    assert estimates.p95("key:a", "free", "m") == 1000  # the last four: 1000, 1000, 1000, 5
    for tokens in (5, 5, 5):
        estimates.add("key:a", "free", "m", tokens)
    assert estimates.p95("key:a", "free", "m") == 5  # the 1000s have left the window
    for client in range(20):
        estimates.add(f"key:{client}", "free", "m", 7)
    assert len(estimates._seen) <= 10


async def test_replicas_on_one_storage_reserve_by_each_others_answers() -> None:
    """Two replicas' tables over one storage (memory here; Redis in the gateway tests): what one
    saw is the other's p95 after both synced, as a histogram that is never below it."""
    clock = qg.FakeClock(10 * GENERATION_S)
    limiter = RateLimiter(qg.MemoryStorage(clock=clock))
    one, two = (Estimates(clock=clock) for _ in range(2))
    one.shared = two.shared = True
    answers = [random.Random(7).randint(150, 250) for _ in range(64)]
    for tokens in answers:
        one.add("key:a", "free", "m", tokens)
    assert two.p95("key:a", "free", "m") is None  # asked: read back at its next sync
    await one.sync(limiter)
    await two.sync(limiter)
    exact = sorted(answers)[(95 * len(answers)) // 100]
    assert two.p95("key:a", "free", "m") == bucket(exact)
    assert two.p95("key:b", "free", "m") == bucket(exact)  # no history: the tier's
    # A generation later both are still read; two later, the answers are gone.
    clock.advance(GENERATION_S)
    await two.sync(limiter)
    assert two.p95("key:a", "free", "m") == bucket(exact)
    clock.advance(GENERATION_S)
    await two.sync(limiter)
    assert two.p95("key:a", "free", "m") is None


@pytest.mark.parametrize("size", [1, 100])
def test_a_histograms_p95_ranks_as_the_window_does(size: int) -> None:
    values = [random.Random(size).randint(1, 60) for _ in range(size)]
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    assert p95_of(counts) == sorted(values)[min(size - 1, (95 * size) // 100)]

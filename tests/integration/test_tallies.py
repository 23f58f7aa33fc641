"""Tallies (the gateway's usage ledger) ride on the decision and settlement calls: a decision
counts a rejection only when it rejects, a settlement always, with or without a lease to
release; on memory and on real Redis, and across a Redis outage (kept, then written)."""

from __future__ import annotations

import pytest

import quotagate as qg
from quotagate.limiter import Acquire, Hit, Tally
from support import RedisServer

DAY = 86_400.0


def _tally(**counts: int) -> Tally:
    return Tally("{client-a}:usage:2026-12-02", tuple(counts.items()), 400 * DAY)


async def test_a_decision_counts_only_a_rejection(storage: qg.Storage) -> None:
    async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
        hit = Hit("{client-a}:req", "2/minute", name="requests")
        rejected = _tally(**{"m|rejected": 1})
        decisions = [await limiter.hit_many([hit], rejected=rejected) for _ in range(3)]
        acquire = Acquire("{client-a}:conc", 0)  # a limit of 0: too large, a rejection too
        refused = await limiter.hit_many([], acquire=acquire, rejected=rejected)
        (counts,) = await limiter.tallies([rejected.key])
    assert [d.allowed for d in decisions] == [True, True, False]
    assert not refused.allowed
    assert counts == {"m|rejected": 2}


async def test_a_settlement_counts_always_and_releases_its_lease(storage: qg.Storage) -> None:
    async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
        tokens = Hit("{client-a}:tok", "100/minute", 50, name="tokens")
        admitted = await limiter.hit_many([tokens], acquire=Acquire("{client-a}:conc", 1))
        assert admitted.lease is not None
        settled = _tally(**{"m|admitted": 1, "m|prompt_tokens": 8, "m|completion_tokens": 12})
        await limiter.settle([tokens._replace(cost=-30)], admitted.lease, settled)
        again = await limiter.hit_many([], acquire=Acquire("{client-a}:conc", 1))
        await limiter.settle([], again.lease, settled)  # nothing to charge: still one call
        await limiter.settle([], None, _tally(**{"other|admitted": 1}))
        (counts,) = await limiter.tallies([settled.key])
        (never,) = await limiter.tallies(["{client-b}:usage:2026-12-02"])
    assert again.allowed  # the first slot was released by the settlement
    assert counts == {
        "m|admitted": 2,
        "m|prompt_tokens": 16,
        "m|completion_tokens": 24,
        "other|admitted": 1,
    }
    assert never == {}


@pytest.mark.redis
async def test_tallies_of_an_outage_are_written_when_redis_is_back(key_prefix: str) -> None:
    with RedisServer() as server:
        primary = qg.RedisStorage(server.url, prefix=key_prefix, timeout=0.5)
        storage = qg.FallbackStorage(primary, probe_interval=0.05)
        async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
            await limiter.settle([], None, _tally(**{"m|admitted": 1}))
            server.stop()
            await limiter.settle([], None, _tally(**{"m|admitted": 1}))
            assert storage.mode == "fallback"
            server.start()
            await qg.testing.async_wait_until(lambda: storage.mode == "redis", 10, "back")
            (counts,) = await limiter.tallies([_tally().key])
    # Redis restarted empty: the first count went with it; the one of the outage was kept.
    assert counts == {"m|admitted": 1}


async def test_reset_leaves_tallies(storage: qg.Storage) -> None:
    async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
        await limiter.settle([], None, _tally(**{"m|admitted": 1}))
        await limiter.hit("{client-a}:req", "1/minute")
        await limiter.reset()
        (counts,) = await limiter.tallies([_tally().key])
        after = await limiter.hit("{client-a}:req", "1/minute")
    assert counts == {"m|admitted": 1}
    assert after.allowed

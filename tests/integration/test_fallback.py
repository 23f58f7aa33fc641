"""FallbackStorage against a real redis-server that the test stops and starts."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

import quotagate as qg
from quotagate.testing import async_wait_until
from support import RedisServer

pytestmark = pytest.mark.redis


def _fallback(server: RedisServer, prefix: str, **kwargs: object) -> qg.FallbackStorage:
    primary = qg.RedisStorage(server.url, prefix=prefix, timeout=0.1)
    return qg.FallbackStorage(primary, probe_interval=0.05, max_probe_interval=0.1, **kwargs)  # type: ignore[arg-type]


async def test_outage_falls_back_to_memory_and_returns(
    key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotagate")
    with RedisServer() as server:
        storage = _fallback(server, key_prefix)
        async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
            assert storage.mode == "redis"
            assert (await limiter.hit("k", "5/hour")).allowed

            server.stop()
            decisions = [await limiter.hit("k", "5/hour") for _ in range(8)]
            assert storage.mode == "fallback"
            # Still limited, in process memory (a fresh bucket of 5): never an exception.
            assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert "fallback policy 'memory'" in warnings[0].getMessage()

            server.start()
            await async_wait_until(lambda: storage.mode == "redis", 10, "back on Redis")
            # Back on Redis (restarted empty): decisions are stored there again.
            after = await limiter.hit("k", "5/hour")
            assert after.allowed
            client = aioredis.Redis.from_url(server.url)
            try:
                assert await client.exists(f"{key_prefix}:{{k}}:3600s") == 1
            finally:
                await client.aclose()
            infos = [r for r in caplog.records if "is back after" in r.getMessage()]
            assert len(infos) == 1
    assert storage.outages == 1


async def test_starting_while_redis_is_down_serves_from_memory(key_prefix: str) -> None:
    server = RedisServer()  # never started
    storage = _fallback(server, key_prefix)
    async with qg.RateLimiter(storage) as limiter:
        assert storage.mode == "fallback"
        assert (await limiter.hit("k", "1/minute")).allowed
        assert not (await limiter.hit("k", "1/minute")).allowed
        server.start()
        try:
            await async_wait_until(lambda: storage.mode == "redis", 10, "back on Redis")
        finally:
            server.close()


async def test_policy_allow_admits_everything_while_down(key_prefix: str) -> None:
    server = RedisServer()
    async with qg.RateLimiter(_fallback(server, key_prefix, policy="allow")) as limiter:
        decisions = [await limiter.hit("k", "1/minute") for _ in range(5)]
        assert all(d.allowed for d in decisions)
        assert (await limiter.acquire("{k}:conc", 1)) is not None


async def test_policy_deny_rejects_everything_while_down(key_prefix: str) -> None:
    server = RedisServer()
    async with qg.RateLimiter(_fallback(server, key_prefix, policy="deny")) as limiter:
        decision = await limiter.hit("k", "100/minute")
        assert not decision.allowed
        assert decision.reason == "unavailable"
        assert decision.retry_after >= 1.0


async def test_fallback_share_splits_limits_between_replicas(key_prefix: str) -> None:
    server = RedisServer()
    async with qg.RateLimiter(_fallback(server, key_prefix, share=0.5)) as limiter:
        decisions = [await limiter.hit("k", "10/hour") for _ in range(8)]
        assert sum(d.allowed for d in decisions) == 5


async def test_refunds_during_an_outage_are_not_lost(key_prefix: str) -> None:
    server = RedisServer()
    async with qg.RateLimiter(_fallback(server, key_prefix)) as limiter:
        await limiter.hit("k", "10/hour", cost=10)
        states = await limiter.adjust("k", "10/hour", delta=-4)
        assert states[0].remaining == 4


async def test_leases_released_during_an_outage_are_released_when_redis_is_back(
    key_prefix: str,
) -> None:
    with RedisServer() as server:
        storage = _fallback(server, key_prefix)
        async with qg.RateLimiter(storage) as limiter:
            lease = await limiter.acquire("{a}:conc", 1, ttl=600)
            assert lease is not None
            server.pause()  # Redis stops answering: a decision times out, the breaker opens
            try:
                await limiter.hit("other", "10/minute")
                assert storage.mode == "fallback"
                await limiter.release(lease)  # while the breaker is open
            finally:
                server.resume()
            await async_wait_until(lambda: storage.mode == "redis", 10, "back on Redis")
            # The slot was given back on Redis once it answered again.
            assert await limiter.acquire("{a}:conc", 1, ttl=600) is not None


async def test_an_outage_leaves_no_lease_on_redis_and_queues_only_redis_leases(
    key_prefix: str,
) -> None:
    """Three leases across a stall: A taken on Redis; B whose call timed out on a paused Redis
    (Redis runs it once it resumes: B exists there too); C granted in memory while the breaker
    is open. All released while it is open: A and B are queued for Redis, C is not (it never
    was there; a long outage would otherwise queue every request's lease). Once Redis is back,
    its lease set is empty and the breaker is closed."""
    with RedisServer() as server:
        storage = _fallback(server, key_prefix)
        async with qg.RateLimiter(storage) as limiter:
            a = await limiter.acquire("{a}:conc", 10, ttl=600)
            assert a is not None
            client = aioredis.Redis.from_url(server.url)
            lease_set = storage.primary.redis_key(a.key)  # type: ignore[attr-defined]
            assert await client.zcard(lease_set) == 1
            server.pause()
            try:
                b = await limiter.acquire("{a}:conc", 10, ttl=600)  # times out: decided in memory
                assert storage.mode == "fallback"
                c = await limiter.acquire("{a}:conc", 10, ttl=600)
                assert a is not None
                assert b is not None
                assert c is not None
                for lease in (a, b, c):
                    await limiter.release(lease)
                assert {lease.id for lease in storage._unreleased} == {a.id, b.id}
            finally:
                server.resume()
            await async_wait_until(lambda: storage.mode == "redis", 10, "back on Redis")
            try:
                assert await client.zcard(lease_set) == 0  # A and B released there
            finally:
                await client.aclose()
            assert storage._unreleased == []

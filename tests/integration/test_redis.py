"""Redis-only behaviour: real redis-server processes, real sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
import redis.asyncio as aioredis
import uvloop

import quotagate as qg
from support import RedisServer, python_env, top_level_commands

pytestmark = pytest.mark.redis


async def test_one_evalsha_per_decision_whatever_the_number_of_limits(
    redis_server: RedisServer, key_prefix: str
) -> None:
    async with qg.RateLimiter(qg.RedisStorage(redis_server.url, prefix=key_prefix)) as limiter:

        async def work() -> None:
            for _ in range(20):
                await limiter.hit_many(
                    [
                        qg.Hit("{c}:req", "60/minute; 1000/day"),
                        qg.Hit("{c}:tok", "40000/minute", cost=350),
                        qg.Hit("{c}:day", "5000/day", algorithm="fixed_window"),
                    ],
                    acquire=qg.Acquire("{c}:conc", 100),
                )

        commands = await top_level_commands(redis_server.url, work)
    assert commands == ["EVALSHA"] * 20


async def test_keys_carry_the_prefix_and_hash_tag(
    redis_server: RedisServer, key_prefix: str
) -> None:
    # Hour-long periods: the states live 60 s and 12 min after the hit (until their buckets are
    # full again), so both are there when listed. (At 60/minute the first one lived 1 s.)
    async with qg.RateLimiter(qg.RedisStorage(redis_server.url, prefix=key_prefix)) as limiter:
        await limiter.hit_many(
            [qg.Hit("{client-a}:req", "60/hour"), qg.Hit("{client-a}:tok", "10/hour", cost=2)]
        )
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = sorted(await client.keys(f"{key_prefix}:*"))
            ttls = [await client.pttl(key) for key in keys]
        finally:
            await client.aclose()
    assert keys == [
        f"{key_prefix}:{{client-a}}:req:3600s",
        f"{key_prefix}:{{client-a}}:tok:3600s",
    ]
    # Each state expires once its bucket is full again: 1 x 60 s, 2 x 360 s.
    assert 0 < ttls[0] <= 60_000
    assert 60_000 < ttls[1] <= 720_000


async def test_concurrent_callers_are_batched_and_exact(
    redis_server: RedisServer, key_prefix: str
) -> None:
    async with qg.RateLimiter(
        qg.RedisStorage(redis_server.url, prefix=key_prefix, timeout=2.0)
    ) as limiter:
        decisions = await asyncio.gather(*(limiter.hit("hot", "50/hour") for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50


async def test_script_flush_is_survived(redis_server: RedisServer, key_prefix: str) -> None:
    # 2/hour: the third hit is refused whatever the time between them (one back per 30 min).
    async with qg.RateLimiter(qg.RedisStorage(redis_server.url, prefix=key_prefix)) as limiter:
        assert (await limiter.hit("k", "2/hour")).allowed
        client = aioredis.Redis.from_url(redis_server.url)
        await client.script_flush()
        await client.aclose()
        assert (await limiter.hit("k", "2/hour")).allowed  # NOSCRIPT -> reloaded, resent
        assert not (await limiter.hit("k", "2/hour")).allowed


async def test_redis_time_is_the_clock(redis_server: RedisServer, key_prefix: str) -> None:
    async with qg.RateLimiter(qg.RedisStorage(redis_server.url, prefix=key_prefix)) as limiter:
        lease = await limiter.acquire("{a}:conc", 1, ttl=30)
        client = aioredis.Redis.from_url(redis_server.url)
        seconds, micros = await client.time()
        await client.aclose()
    assert lease is not None
    server_now = seconds * 1_000_000 + micros
    assert 0 < lease.expires_at_us - server_now <= 30_000_000


def test_two_processes_share_one_limit(redis_server: RedisServer, key_prefix: str) -> None:
    worker = textwrap.dedent(
        f"""
        import asyncio, quotagate as qg
        async def main():
            storage = qg.RedisStorage({redis_server.url!r}, prefix={key_prefix!r}, timeout=5.0)
            async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
                hits = (limiter.hit("shared", "50/hour") for _ in range(50))
                decisions = await asyncio.gather(*hits)
            print(sum(d.allowed for d in decisions))
        asyncio.run(main())
        """
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True, env=python_env()
        )
        for _ in range(2)
    ]
    admitted = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        admitted.append(int(out.strip()))
    assert sum(admitted) == 50


async def test_a_redis_storage_reports_outages_as_storage_errors(key_prefix: str) -> None:
    with RedisServer() as server:
        storage = qg.RedisStorage(server.url, prefix=key_prefix, timeout=0.1)
        await storage.start()
        try:
            server.stop()
            with pytest.raises(qg.StorageError):
                await storage.decide(["{k}:x"], [1, 1, 10, 1_000_000, 1])
        finally:
            await storage.aclose()


async def test_start_fails_clearly_when_redis_is_absent() -> None:
    from support import free_port

    storage = qg.RedisStorage(f"redis://:pw@127.0.0.1:{free_port()}/0", timeout=0.1)
    with pytest.raises(
        qg.StorageError, match=r"cannot reach Redis at redis://:\*\*\*@127\.0\.0\.1"
    ):
        await storage.start()
    await storage.aclose()


async def test_a_paused_redis_costs_at_most_the_timeout(key_prefix: str) -> None:
    with RedisServer() as server:
        storage = qg.RedisStorage(server.url, prefix=key_prefix, timeout=0.1)
        await storage.start()
        server.pause()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(qg.StorageError):
                await storage.decide(["{k}:x"], [1, 1, 10, 1_000_000, 1])
            assert loop.time() - started < 0.5
        finally:
            server.resume()
            await storage.aclose()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reply_that_arrived_while_the_event_loop_was_stuck_is_not_a_timeout(
    redis_server: RedisServer, key_prefix: str, loop: str
) -> None:
    """The timeout measures Redis, not the event loop: a loop blocked past the timeout (CPU
    starvation, a slow callback) finds the reply in the socket and takes it. uvloop runs due
    timers before it polls sockets, so it is the loop that needs this (``quotagate serve``'s)."""

    async def main() -> list[int]:
        storage = qg.RedisStorage(redis_server.url, prefix=key_prefix, timeout=0.05)
        await storage.start()
        try:
            call = asyncio.ensure_future(storage.decide(["{k}:x"], [1, 1, 10, 1_000_000, 1]))
            await asyncio.sleep(0)  # the EVALSHA is written
            time.sleep(0.3)  # noqa: ASYNC251 -- the loop is stuck six timeouts long on purpose
            return list(await call)
        finally:
            await storage.aclose()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(main())
    assert out[0] == 0  # allowed, as a healthy Redis decided


async def test_reset_deletes_its_prefix_only_and_prefix_globs_are_literal(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """A prefix ``p*`` must not reach ``pX:...`` keys (its ``*`` is a character, not a glob);
    other data in the database is left alone; more keys than one SCAN page all go."""
    raw = aioredis.Redis.from_url(redis_server.url)
    starred = qg.RedisStorage(redis_server.url, prefix=key_prefix + "*")
    neighbour = qg.RedisStorage(redis_server.url, prefix=key_prefix + "X")
    try:
        async with starred, neighbour:
            mine, theirs = qg.RateLimiter(starred), qg.RateLimiter(neighbour)
            for i in range(1200):  # over two SCAN / UNLINK batches
                await mine.hit(f"client-{i}", "5/day")
            await theirs.hit("client-0", "5/day")
            await raw.set(f"{key_prefix}-foreign", "keep me")

            assert await mine.reset() == 1200
            assert (await mine.hit("client-0", "5/day")).remaining == 4
            assert (await theirs.hit("client-0", "5/day")).remaining == 3  # untouched
            assert await raw.get(f"{key_prefix}-foreign") == b"keep me"
    finally:
        await raw.delete(f"{key_prefix}-foreign")
        await raw.aclose()


async def test_reset_without_a_prefix_is_refused(redis_server: RedisServer) -> None:
    async with qg.RedisStorage(redis_server.url, prefix="") as storage:
        with pytest.raises(qg.ConfigError, match="prefix"):
            await storage.reset()


async def test_reset_of_the_fallback_storage_resets_both_sides(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """Redis up: both the shared counters and the fallback memory start afresh. Redis down:
    a StorageError says the shared counters were not reset."""
    storage = qg.storage_from_url(f"{redis_server.url}?prefix={key_prefix}")
    assert isinstance(storage, qg.FallbackStorage)
    limiter = qg.RateLimiter(storage, overlimit_cache=True)
    async with storage:
        for _ in range(3):
            await limiter.hit("alice", "2/day")
        await qg.RateLimiter(storage.memory).hit("bob", "2/day")  # a state on that side
        assert await limiter.reset() == 2  # Redis' alice, the memory side's bob
        assert (await limiter.hit("alice", "2/day")).allowed  # not the cached 429
        assert len(storage.memory) == 0

        shared, storage.primary = storage.primary, qg.RedisStorage("redis://127.0.0.1:1/0")
        try:
            with pytest.raises(qg.StorageError):  # a Redis that cannot be reached
                await storage.reset()
        finally:
            storage.primary = shared

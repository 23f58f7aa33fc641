"""Redis faults under load, against a real gateway process and a redis-server of each test's
own: killed (SIGKILL) mid-load, paused (SIGSTOP), and the ``deny`` / ``allow`` fallback
policies. The load is closed-loop, bounded in count and time, and every request is timed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_kit import (
    KEY_FREE,
    KEY_PRO,
    Gateway,
    LoadResult,
    config_text,
    gateways,
    http_client,
    metrics_of,
    percentile,
    run_load,
    sample,
)

from helpers import error_code, error_of
from quotagate.testing import async_wait_until
from support import RedisServer

pytestmark = [pytest.mark.reliability, pytest.mark.redis]

TIMEOUT_MS = 100
WARNING = "shared storage unavailable"
BACK = "shared storage is back after"

TIERS = f"""
[tiers.pro]
requests = "1000000/minute"
tokens = "100000000/minute"
concurrency = 1000
default_max_tokens = 30

[tiers.free]
requests = "3/day"

[[keys]]
key = "{KEY_PRO}"
tier = "pro"

[[keys]]
key = "{KEY_FREE}"
tier = "free"
"""


def fault_config(redis: RedisServer, fallback: str = "memory") -> str:
    return config_text(TIERS, storage_url=redis.url, fallback=fallback, timeout_ms=TIMEOUT_MS)


def completions(client: httpx.AsyncClient, base: str, key: str) -> Callable[[int], httpx.Request]:
    """A request factory: a pro completion reserving 1 + 30 tokens and settling on 1 + 24
    (so every request also makes a settlement call and a lease release)."""

    def make(_: int) -> httpx.Request:
        return client.build_request(
            "POST",
            f"{base}/v1/completions",
            json={"prompt": "x", "max_tokens": 30},
            headers={"X-API-Key": key},
        )

    return make


async def storage_mode(client: httpx.AsyncClient, base: str) -> str:
    """What /health says about storage (or ``"<status>"`` when it does not answer 200)."""
    response = await client.get(f"{base}/health")
    if response.status_code != 200:
        return str(response.status_code)
    return str(response.json()["storage"])


async def answers_reach(result: LoadResult, count: int, seconds: float = 20) -> None:
    async def enough() -> bool:
        return len(result.sent) >= count

    await async_wait_until(enough, seconds, f"{count} answers")


async def test_redis_killed_mid_load_no_5xx_one_warning_and_back_within_5_s(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    with RedisServer() as redis, gateways(Gateway(fault_config(redis), tmp_path)) as (gateway,):
        async with http_client() as client:
            assert await storage_mode(client, gateway.url) == "redis"
            result, stop = LoadResult(), asyncio.Event()
            load = asyncio.create_task(
                run_load(
                    client,
                    completions(client, gateway.url, KEY_PRO),
                    workers=16,
                    max_requests=50_000,
                    max_seconds=60,
                    stop=stop,
                    result=result,
                )
            )
            try:
                await answers_reach(result, 300)
                redis.kill()  # SIGKILL
                killed_at, before_kill = time.monotonic(), len(result.sent)

                async def in_fallback() -> bool:
                    return await storage_mode(client, gateway.url) == "fallback"

                detected = await async_wait_until(in_fallback, 5, "fallback mode")
                metrics = await metrics_of(client, gateway.url)
                assert sample(metrics, "quotagate_storage_mode", mode="fallback") == 1
                assert sample(metrics, "quotagate_storage_mode", mode="redis") == 0
                await answers_reach(result, len(result.sent) + 500)

                redis.start()  # the same port, empty
                restarted_at = time.monotonic()

                async def back_on_redis() -> bool:
                    return await storage_mode(client, gateway.url) == "redis"

                recovered = await async_wait_until(back_on_redis, 5, "back to shared mode")
                outage_answers = len(result.sent) - before_kill
                await answers_reach(result, len(result.sent) + 300)
                metrics = await metrics_of(client, gateway.url)
            finally:
                stop.set()
                await load
    statuses = result.statuses()
    outages = [line for line in gateway.output().splitlines() if WARNING in line]
    figures.update(
        outage_warnings=outages,
        requests=len(result.sent),
        statuses=dict(statuses),
        answered_while_redis_down=outage_answers,
        outage_seconds=round(restarted_at - killed_at, 2),
        fallback_detected_seconds=round(detected, 3),
        back_to_redis_seconds=round(recovered, 3),
        warnings_logged=gateway.count(WARNING),
        back_lines_logged=gateway.count(BACK),
        p99_ms=round(percentile(result.latencies(), 99) * 1000, 1),
    )
    assert statuses[0] == 0, "every request answered"
    assert set(statuses) == {200}, statuses  # no 5xx, and no limit was near
    assert gateway.count(WARNING) == 1
    assert gateway.count(BACK) == 1
    assert gateway.count("ERROR") == 0
    assert sample(metrics, "quotagate_storage_mode", mode="redis") == 1
    assert recovered < 5


async def test_redis_paused_p99_stays_under_the_timeout_plus_50_ms(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    pause_seconds = 3.0
    with RedisServer() as redis, gateways(Gateway(fault_config(redis), tmp_path)) as (gateway,):
        async with http_client() as client:
            result, stop = LoadResult(), asyncio.Event()
            load = asyncio.create_task(
                run_load(
                    client,
                    completions(client, gateway.url, KEY_PRO),
                    workers=4,
                    max_requests=50_000,
                    max_seconds=60,
                    stop=stop,
                    result=result,
                )
            )
            try:
                await answers_reach(result, 300)  # warmed up: connections open, code paths hot
                baseline_from = time.monotonic()
                await answers_reach(result, 800)
                paused_at = time.monotonic()
                redis.pause()
                try:
                    await asyncio.sleep(pause_seconds)  # the fault's length, not a wait for it
                finally:
                    redis.resume()
                resumed_at = time.monotonic()

                async def back_on_redis() -> bool:
                    return await storage_mode(client, gateway.url) == "redis"

                recovered = await async_wait_until(back_on_redis, 10, "back to shared mode")
                await answers_reach(result, len(result.sent) + 300)
            finally:
                stop.set()
                await load
    before = result.latencies(since=baseline_from, until=paused_at)
    # During the pause: every request in flight at any moment of it (those caught by the
    # SIGSTOP included), answered or not.
    during = [
        s.seconds
        for s in result.sent
        if s.started < resumed_at and s.started + s.seconds > paused_at and s.status
    ]
    after = result.latencies(since=resumed_at)
    statuses = result.statuses()
    p99_during = percentile(during, 99)
    slowest = sorted(
        ((round(s.seconds * 1000), round((s.started - paused_at) * 1000)) for s in result.sent),
        reverse=True,
    )[:6]
    figures.update(
        slowest_ms_and_start_offset_ms=slowest,
        timeout_ms=TIMEOUT_MS,
        pause_seconds=round(resumed_at - paused_at, 2),
        answered_during_pause=len(during),
        p50_before_ms=round(percentile(before, 50) * 1000, 1),
        p99_before_ms=round(percentile(before, 99) * 1000, 1),
        p50_during_ms=round(percentile(during, 50) * 1000, 1),
        p99_during_ms=round(p99_during * 1000, 1),
        max_during_ms=round(max(during) * 1000, 1),
        p99_after_ms=round(percentile(after, 99) * 1000, 1),
        back_to_redis_seconds=round(recovered, 3),
        statuses=dict(statuses),
        warnings_logged=gateway.count(WARNING),
    )
    assert statuses[0] == 0
    assert set(statuses) == {200}, statuses
    assert len(during) >= 100, "requests kept flowing during the pause"
    assert p99_during < (TIMEOUT_MS + 50) / 1000
    assert gateway.count(WARNING) == 1
    assert gateway.count(BACK) == 1


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_fallback_policy_while_redis_is_down(
    tmp_path: Path, policy: str, figures: dict[str, Any]
) -> None:
    with RedisServer() as redis, gateways(Gateway(fault_config(redis, policy), tmp_path)) as gs:
        gateway = gs[0]
        async with http_client() as client:

            async def free_request() -> httpx.Response:
                return await client.post(
                    f"{gateway.url}/v1/completions",
                    json={"prompt": "x", "max_tokens": 4},
                    headers={"X-API-Key": KEY_FREE},
                )

            up = [await free_request() for _ in range(4)]  # free: 3/day on Redis (no refill)
            assert [r.status_code for r in up] == [200, 200, 200, 429]
            redis.kill()  # SIGKILL
            down = [await free_request() for _ in range(10)]
            metrics = await metrics_of(client, gateway.url)
            redis.start()

            async def back_on_redis() -> bool:
                return await storage_mode(client, gateway.url) == "redis"

            recovered = await async_wait_until(back_on_redis, 5, "back to shared mode")
            back = await free_request()  # Redis restarted empty: a fresh bucket
    statuses = [r.status_code for r in down]
    figures.update(
        policy=policy,
        statuses_while_down=statuses,
        unlimited_counted=sample(metrics, "quotagate_unlimited_decisions_total", tier="free"),
        back_to_redis_seconds=round(recovered, 3),
    )
    assert sample(metrics, "quotagate_storage_mode", mode="fallback") == 1
    assert back.status_code == 200
    if policy == "deny":
        assert statuses == [503] * 10
        for response in down:
            assert int(response.headers["retry-after"]) >= 1
            body = response.json()
            assert error_code(body) == "rate_limiter_unavailable"
            assert error_of(body)["retry_after"] >= 1
        assert sample(metrics, "quotagate_rejections_total", tier="free", limit="storage") == 10
        assert sample(metrics, "quotagate_unlimited_decisions_total", tier="free") == 0
    else:
        # Past the tier's 3/day, and every one counted as unlimited.
        assert statuses == [200] * 10
        assert sample(metrics, "quotagate_unlimited_decisions_total", tier="free") == 10


async def test_health_reports_fallback_under_the_deny_policy(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """/health is how operators (and liveness probes) see an outage: it must answer 200 with
    ``"storage": "fallback"``, not be denied with the inference traffic. (Found by this suite:
    /health ran its own limit through the same storage, so ``deny`` answered it 503, and a
    liveness probe would restart every replica during a Redis outage. Finding 4.)"""
    with RedisServer() as redis, gateways(Gateway(fault_config(redis, "deny"), tmp_path)) as gs:
        async with http_client() as client:
            assert (await client.get(f"{gs[0].url}/health")).json()["storage"] == "redis"
            redis.kill()  # SIGKILL
            health = await client.get(f"{gs[0].url}/health")
            metrics = await metrics_of(client, gs[0].url)
    figures.update(health_status_while_down=health.status_code, health_body=health.text)
    assert sample(metrics, "quotagate_storage_mode", mode="fallback") == 1
    assert health.status_code == 200
    assert health.json()["storage"] == "fallback"

"""Two ``quotagate serve`` processes share one real Redis: a burst spread over both admits
exactly what the tier allows, and every request is answered."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import (
    KEY_LIMITED,
    KEY_PRO,
    KEY_TOKENS,
    Gateway,
    RawAnswer,
    check_request_burst,
    completion_burst,
    config_text,
    gateways,
    http_client,
    ratelimit_of,
    warm,
)

from helpers import error_of
from quotagate.testing import async_wait_until
from support import RedisServer

pytestmark = [pytest.mark.reliability, pytest.mark.redis]

BURST = 200
REQUESTS_PER_MINUTE = 50
TOKENS_PER_WEEK = 2000  # a week-long period: no measurable refill while the test runs
LEASES = 1000

TIERS = f"""
[tiers.limited]
requests = "{REQUESTS_PER_MINUTE}/minute"

[tiers.tokens]
requests = "100000/minute"
tokens = "{TOKENS_PER_WEEK}/week"
default_max_tokens = 24

[tiers.leased]
requests = "100000/minute"
concurrency = {LEASES}

[[keys]]
key = "{KEY_LIMITED}"
tier = "limited"

[[keys]]
key = "{KEY_PRO}"
tier = "leased"

[[keys]]
key = "{KEY_TOKENS}"
tier = "tokens"
"""


def two_instances(url: str, prefix: str, directory: Path) -> tuple[Gateway, Gateway]:
    config = config_text(TIERS, storage_url=url, prefix=prefix)
    return Gateway(config, directory, name="a"), Gateway(config, directory, name="b")


async def test_two_instances_on_one_redis_admit_exactly_the_request_limit(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str, figures: dict[str, Any]
) -> None:
    with gateways(*two_instances(redis_server.url, key_prefix, tmp_path)) as instances:
        await warm(*instances)
        bodies = [{"prompt": "x", "max_tokens": 4}] * BURST
        started = time.monotonic()
        answers, span = await completion_burst(instances, KEY_LIMITED, bodies)
        async with http_client() as client:
            remaining = [
                (await ratelimit_of(client, g.url, KEY_LIMITED))["requests"]["remaining"]
                for g in instances
            ]
        elapsed = time.monotonic() - started
    admitted = check_request_burst(answers, span, REQUESTS_PER_MINUTE)
    per_instance = [
        sum(1 for a in answers[n :: len(instances)] if isinstance(a, RawAnswer) and a.status == 200)
        for n in range(len(instances))
    ]
    figures.update(
        burst=BURST,
        admitted=admitted,
        rejected_429=BURST - admitted,
        unanswered=0,
        admitted_per_instance=per_instance,
        remaining_per_instance=remaining,
        burst_seconds=round(span, 3),
    )
    # Each instance was sent BURST / 2 = 2 x its tier's limit: with counters of their own they
    # would admit 2 x N between them, and the one that happened to admit fewer would still
    # show room. Which instance wins the race is up to the scheduler, so the proof is the total
    # and that both read the same emptied bucket.
    assert admitted < 2 * REQUESTS_PER_MINUTE
    refill = int(elapsed // (60 / REQUESTS_PER_MINUTE))  # GCRA's refill since the burst began
    assert all(r <= refill for r in remaining), (remaining, refill)


async def test_two_instances_on_one_redis_never_admit_more_tokens_than_the_limit(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str, figures: dict[str, Any]
) -> None:
    rng = random.Random(5)
    # Completions of prompt "x" (1 token) capped at k <= 24 tokens: the mock generates exactly
    # k, so each admitted request costs 1 + k both reserved and settled.
    bodies = [{"prompt": "x", "max_tokens": rng.randint(1, 24)} for _ in range(BURST)]
    with gateways(*two_instances(redis_server.url, key_prefix, tmp_path)) as instances:
        await warm(*instances)
        answers, span = await completion_burst(instances, KEY_TOKENS, bodies)
        async with http_client() as client:
            state = await ratelimit_of(client, instances[0].url, KEY_TOKENS)
    assert all(isinstance(a, RawAnswer) for a in answers), "every request answered"
    replies = [a for a in answers if isinstance(a, RawAnswer)]
    costs = [1 + body["max_tokens"] for body in bodies]
    admitted = [c for c, a in zip(costs, replies, strict=True) if a.status == 200]
    rejected = [a for a in replies if a.status == 429]
    assert len(admitted) + len(rejected) == BURST
    assert all(error_of(a.json())["limit"] == "tokens" for a in rejected)
    for cost, answer in zip(costs, replies, strict=True):
        if answer.status == 200:
            assert answer.json()["usage"]["total_tokens"] == cost
    assert sum(admitted) <= TOKENS_PER_WEEK
    # Shared state agrees to the token, and the bucket was filled: every rejection saw less
    # left than its cost (<= 25), and what is left only shrank since.
    assert state["tokens"]["remaining"] == TOKENS_PER_WEEK - sum(admitted)
    assert state["tokens"]["remaining"] < 25
    figures.update(
        burst=BURST,
        tokens_asked=sum(costs),
        tokens_admitted=sum(admitted),
        token_limit=TOKENS_PER_WEEK,
        admitted=len(admitted),
        rejected_429=len(rejected),
        burst_seconds=round(span, 3),
    )


async def test_two_instances_release_every_lease_of_a_burst(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str, figures: dict[str, Any]
) -> None:
    """200 concurrent requests holding concurrency leases, over two instances: every lease is
    given back and Redis never looks down. (Found by the soak: releases went through redis-py's
    pool of 64 connections, which raises MaxConnectionsError instead of waiting; the failed
    release tripped the fallback, and every Redis lease released during the fallback was
    skipped, so leases leaked until their TTL, timeout_s + 30 s = 630 s by default. RELIABILITY.md,
    finding 6.)"""
    with gateways(*two_instances(redis_server.url, key_prefix, tmp_path)) as instances:
        await warm(*instances)
        bodies = [{"prompt": "x", "max_tokens": 4}] * BURST
        answers, _ = await completion_burst(instances, KEY_PRO, bodies)
        async with http_client() as client:

            async def on_redis() -> bool:  # /v1/ratelimit reads fallback memory meanwhile
                modes = [(await client.get(f"{g.url}/health")).json() for g in instances]
                return all(m["storage"] == "redis" for m in modes)

            await async_wait_until(on_redis, 10, "both instances on Redis")

            async def released() -> bool:
                state = await ratelimit_of(client, instances[0].url, KEY_PRO)
                return bool(state["concurrency"]["remaining"] == LEASES)

            try:
                await async_wait_until(released, 5, "every lease released")
                held = 0
            except TimeoutError:
                held = (
                    LEASES
                    - (await ratelimit_of(client, instances[0].url, KEY_PRO))["concurrency"][
                        "remaining"
                    ]
                )
        warnings = [line for g in instances for line in g.output().splitlines() if "WARN" in line]
    statuses = [a.status if isinstance(a, RawAnswer) else a for a in answers]
    figures.update(
        burst=BURST,
        statuses={str(s): statuses.count(s) for s in set(statuses)},
        leases_still_held_after_5_s=held,
        fallback_warnings=len(warnings),
        first_warning=warnings[0] if warnings else None,
    )
    assert statuses == [200] * BURST
    assert held == 0, f"{held} leases still held 5 s after the burst"
    assert not warnings

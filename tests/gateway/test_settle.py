"""Settlement is one storage call: a request with tier tokens, model tokens and a concurrency
lease reconciles both token limits and releases its lease in ONE EVALSHA on Redis (seen with
MONITOR) and one function call in memory (ARCHITECTURE: "a second call at most")."""

from __future__ import annotations

from pathlib import Path

import pytest

import quotagate as qg
from helpers import ALICE, NATURAL_LENGTH, base_config, completion_prompt, gateway_app, in_process
from support import RedisServer, top_level_commands

MODEL_TOKENS = """
[tiers.free.models."big-model"]
tokens = "100/minute"
"""
BODY = {"model": "big-model", "prompt": "Say hi", "max_tokens": 60}
USED = completion_prompt("Say hi") + NATURAL_LENGTH


@pytest.mark.redis
async def test_settling_tokens_model_tokens_and_a_lease_is_one_evalsha(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    storage = qg.RedisStorage(redis_server.url, prefix=key_prefix)
    app = gateway_app(base_config(tmp_path, extra=MODEL_TOKENS), storage)
    headers = {"X-API-Key": ALICE}
    async with in_process(app) as client:
        await client.get("/v1/ratelimit", headers=headers)  # connected, scripts loaded

        async def one_request() -> None:
            response = await client.post("/v1/completions", json=BODY, headers=headers)
            assert response.status_code == 200, response.text

        commands = await top_level_commands(redis_server.url, one_request)
        state = (await client.get("/v1/ratelimit", headers=headers)).json()
    # The decision (requests, tokens, model tokens, lease) and the settlement: nothing else,
    # no ZREM of its own for the lease, no call per token limit.
    assert commands == ["EVALSHA", "EVALSHA"]
    by_name = {limit["name"]: limit for limit in state["limits"]}
    assert by_name["concurrency"]["remaining"] == 1  # the lease was released
    # Settled on the real usage: the reservation of (prompt + 60) is gone, the usage stays
    # (GCRA refills between the request and the read: at most one unit at 600/minute).
    assert 600 - USED <= by_name["tokens"]["remaining"] <= 600 - USED + 1


async def test_settling_in_memory_is_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = qg.FakeClock()
    storage = qg.MemoryStorage(clock=clock)
    calls: list[str] = []
    for name in ("decide_now", "adjust_now", "release_now"):
        original = getattr(storage, name)

        def counted(*args: object, _name: str = name, _original: object = original) -> object:
            calls.append(_name)
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(storage, name, counted)
    app = gateway_app(base_config(tmp_path, extra=MODEL_TOKENS), storage)
    async with in_process(app) as client:
        response = await client.post("/v1/completions", json=BODY, headers={"X-API-Key": ALICE})
        assert response.status_code == 200, response.text
        during = list(calls)
        state = (await client.get("/v1/ratelimit", headers={"X-API-Key": ALICE})).json()
    # adjust_now releases the lease itself (release_now called from inside it, not again).
    assert during == ["decide_now", "adjust_now", "release_now"]
    by_name = {limit["name"]: limit for limit in state["limits"]}
    assert by_name["concurrency"]["remaining"] == 1
    assert by_name["tokens"]["remaining"] == 600 - USED  # the fake clock stood still


async def test_a_settle_with_nothing_to_charge_and_no_lease_makes_no_call() -> None:
    storage = qg.MemoryStorage(clock=qg.FakeClock())
    async with qg.RateLimiter(storage) as limiter:
        assert await limiter.settle([qg.Hit("k", "10/minute", 0)]) == ()
        assert len(storage) == 0


async def test_a_lease_with_nothing_to_charge_is_released_alone() -> None:
    storage = qg.MemoryStorage(clock=qg.FakeClock())
    async with qg.RateLimiter(storage) as limiter:
        lease = await limiter.acquire("{c}:conc", 1)
        assert lease is not None
        assert await limiter.acquire("{c}:conc", 1) is None
        assert await limiter.settle([qg.Hit("{c}:tok", "10/minute", 0)], lease) == ()
        assert await limiter.acquire("{c}:conc", 1) is not None

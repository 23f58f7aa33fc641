"""A changed limit keeps what was already counted in the current period (a reload here; a key's
new limits the same way): raised from 10 to 20 a minute after using 10, a client has 10 more at
once; lowered to 5, it is over until enough time passes. Concurrency slots held stay held. On
memory and on Redis, on one frozen clock, so every count is exact."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import quotagate as qg
from helpers import in_process
from quotagate.gateway.app import Gateway, create_app
from quotagate.gateway.config import load_config

ALICE = "sk-change-alice"
CONFIG = """
[tiers.free]
requests = "{requests}"
tokens = "1000000/minute"

[[keys]]
key = "{key}"
tier = "free"
"""


async def _burst(client: httpx.AsyncClient, n: int) -> list[int]:
    body = {"prompt": "x", "max_tokens": 1}
    return [
        (await client.post("/v1/completions", json=body, headers={"X-API-Key": ALICE})).status_code
        for _ in range(n)
    ]


def _write(path: Path, requests: str) -> None:
    path.write_text(CONFIG.format(requests=requests, key=ALICE), "utf-8")


async def test_a_raised_rate_gives_the_difference_at_once(
    tmp_path: Path, storage: qg.Storage
) -> None:
    path = tmp_path / "gateway.toml"
    _write(path, "10/minute")
    app = create_app(load_config(path, environ={}), storage=storage, config_path=str(path))
    async with in_process(app) as client:
        before = await _burst(client, 11)
        _write(path, "20/minute")
        assert app.state.gateway.reload()
        after = await _burst(client, 11)
    assert before == [200] * 10 + [429]
    assert after == [200] * 10 + [429]  # 10 of the 20 were used: 10 more, not 20


async def test_a_lowered_rate_is_over_until_enough_time_passes(
    tmp_path: Path, storage: qg.Storage, clock: qg.FakeClock
) -> None:
    path = tmp_path / "gateway.toml"
    _write(path, "10/minute")
    app = create_app(load_config(path, environ={}), storage=storage, config_path=str(path))
    async with in_process(app) as client:
        used = await _burst(client, 5)
        _write(path, "5/minute")
        gateway: Gateway = app.state.gateway
        assert gateway.reload()
        (over,) = await _burst(client, 1)
        body = {"prompt": "x", "max_tokens": 1}
        refused = await client.post("/v1/completions", json=body, headers={"X-API-Key": ALICE})
        clock.advance(12)  # 5/minute frees one every 12 s
        freed = await _burst(client, 2)
    assert used == [200] * 5
    assert over == 429  # 5 used of the new 5: not a fresh counter
    assert refused.headers["retry-after"] == "12"
    assert freed == [200, 429]


@pytest.mark.parametrize(("lowered", "raised"), [(1, 3)])
async def test_held_concurrency_slots_count_against_a_changed_limit(
    storage: qg.Storage, lowered: int, raised: int
) -> None:
    async with qg.RateLimiter(storage, overlimit_cache=False) as limiter:
        held = [await limiter.acquire("{client-a}:conc", limit=2) for _ in range(2)]
        assert all(lease is not None for lease in held)
        assert await limiter.acquire("{client-a}:conc", limit=lowered) is None  # 2 held of 1
        third = await limiter.acquire("{client-a}:conc", limit=raised)
        assert third is not None  # 2 held of 3: one more
        assert await limiter.acquire("{client-a}:conc", limit=raised) is None

"""``reserve = "estimate"``: a request reserves the recent p95 of its client's answers rather
than its whole ``max_tokens``, and is held to what its limits still allow while the answer is
produced: a stream ended by the gateway (``finish_reason: "length"``, read by the official
SDK without an exception), a non-streamed request's ``max_tokens`` injected upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import quotagate as qg
from helpers import (
    RecordingUpstream,
    chat_prompt,
    config_from,
    gateway_app,
    in_process,
    metric_samples,
    sample,
)
from quotagate.gateway.app import create_app
from quotagate.gateway.backends.mock import MockBackend
from support import RedisServer

CONFIG = """
[backend]
max_concurrency = 8

[tiers.metered]
requests = "1000/minute"
tokens = "{tokens}/minute"
default_max_tokens = 30
reserve = "{reserve}"

[[keys]]
key = "sk-acme-0001"
tier = "metered"
"""

KEY = {"X-API-Key": "sk-acme-0001"}
MESSAGES = [{"role": "user", "content": "hi"}]
PROMPT = chat_prompt(MESSAGES)


def config(tmp_path: Path, tokens: int = 100_000, reserve: str = "estimate") -> Any:
    return config_from(tmp_path, CONFIG.format(tokens=tokens, reserve=reserve))


async def ask(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    body = {"model": "quotagate-mock", "messages": MESSAGES, "max_tokens": 4096, **extra}
    return await client.post("/v1/chat/completions", json=body, headers=KEY)


async def test_the_reservation_is_the_clients_recent_p95_not_max_tokens(tmp_path: Path) -> None:
    async with in_process(gateway_app(config(tmp_path))) as client:
        first = await ask(client)  # no history: the tier's default_max_tokens (30)
        assert first.status_code == 200
        assert first.json()["usage"]["completion_tokens"] == 24  # the mock's answer
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (PROMPT + 30)
        second = await ask(client)  # one answer seen: 24 likely
        left = 100_000 - (PROMPT + 24) - (PROMPT + 24)  # the first settled on its usage
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == left
    async with in_process(gateway_app(config(tmp_path, reserve="max_tokens"))) as client:
        whole = await ask(client)
        assert int(whole.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (PROMPT + 4096)


async def test_a_stream_is_ended_at_what_the_limits_allow_and_the_sdk_reads_it(
    tmp_path: Path,
) -> None:
    # 100 tokens a minute: the reservation (prompt + 30) and the 70 - prompt after it.
    app = create_app(
        config(tmp_path, tokens=100),
        storage=qg.MemoryStorage(clock=qg.FakeClock()),
        backend=MockBackend(output_tokens=500),
    )
    async with in_process(app) as client:
        sdk = openai.AsyncOpenAI(
            base_url="http://gateway.test/v1",
            api_key="sk-acme-0001",
            http_client=client,
            max_retries=0,
        )
        stream = await sdk.chat.completions.create(
            model="quotagate-mock",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4096,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        limits = (await client.get("/v1/ratelimit", headers=KEY)).json()["limits"]
        metrics = metric_samples((await client.get("/metrics")).text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 100 - PROMPT  # all the limit allowed
    tokens = next(entry for entry in limits if entry["name"] == "tokens")
    assert tokens["remaining"] == 0  # settled on exactly what was generated: 100
    assert sample(metrics, "quotagate_allowance_cuts_total", tier="metered", how="stream") == 1


async def test_a_completion_gets_what_the_limits_allow_as_its_max_tokens(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    app = gateway_app(config(tmp_path, tokens=100), backend=upstream.backend())
    async with in_process(app) as client:
        answer = await ask(client)
        metrics = metric_samples((await client.get("/metrics")).text)
    assert answer.status_code == 200
    assert upstream.bodies[-1]["max_tokens"] == 100 - PROMPT  # not 4096
    assert sample(metrics, "quotagate_allowance_cuts_total", tier="metered", how="max_tokens") == 1


async def test_a_stream_that_outgrows_its_estimate_reserves_more_and_is_not_cut(
    tmp_path: Path,
) -> None:
    """Room to spare: the answer runs to its end (500 tokens over a reservation of 30), the
    reservation grown as it came, and settled on exactly what was generated."""
    app = create_app(
        config(tmp_path),
        storage=qg.MemoryStorage(clock=qg.FakeClock()),
        backend=MockBackend(output_tokens=500),
    )
    async with in_process(app) as client:
        answer = await ask(client, stream=True, stream_options={"include_usage": True})
        limits = (await client.get("/v1/ratelimit", headers=KEY)).json()["limits"]
        metrics = metric_samples((await client.get("/metrics")).text)
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 500
    tokens = next(entry for entry in limits if entry["name"] == "tokens")
    assert tokens["remaining"] == 100_000 - (PROMPT + 500)
    assert sample(metrics, "quotagate_allowance_cuts_total", tier="metered", how="stream") == 0


async def concurrent_streams(clients: list[httpx.AsyncClient], count: int) -> list[int]:
    """``count`` streams at once, spread over ``clients``: each one's completion tokens."""

    async def one(client: httpx.AsyncClient) -> int:
        answer = await ask(client, stream=True, stream_options={"include_usage": True})
        assert answer.status_code == 200, answer.text
        events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return int(json.loads(events[-2])["usage"]["completion_tokens"])

    return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(count)))


async def test_concurrent_streams_outgrowing_their_estimates_never_overshoot(
    tmp_path: Path,
) -> None:
    """16 streams of 500 tokens admitted on reservations of 30 each against 1,000 tokens a
    minute: together they generate at most what the limit holds, not 16 x what was left."""
    app = create_app(
        config(tmp_path, tokens=1000),
        storage=qg.MemoryStorage(clock=qg.FakeClock()),
        backend=MockBackend(tokens_per_second=5000, output_tokens=500),
    )
    async with in_process(app) as client:
        completions = await concurrent_streams([client], 16)
        limits = (await client.get("/v1/ratelimit", headers=KEY)).json()["limits"]
    used = sum(completions) + 16 * PROMPT
    assert used <= 1000
    tokens = next(entry for entry in limits if entry["name"] == "tokens")
    assert tokens["remaining"] == 1000 - used  # settled on exactly what was generated
    assert min(completions) < 500  # held: they could not all have their answers


BUDGET_CONFIG = """
[backend]
max_concurrency = 64

[prices."quotagate-mock"]
input = 0
output = 1                       # a micro-dollar a generated token

[tiers.metered]
requests = "10000/minute"
tokens = "100000000/minute"
default_max_tokens = 30
budget = "$0.002/day"
reserve = "estimate"

[[keys]]
key = "sk-acme-0001"
tier = "metered"
"""


@pytest.mark.redis
async def test_streams_over_two_replicas_never_overshoot_a_budget_with_estimates(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    """40 streams over two gateways on one Redis, each admitted on 30 micro-dollars and
    answering 100 tokens (4,000 micro-dollars in all) against a $0.002 budget: what they are
    charged together stays within the 2,000 the budget holds."""
    gateways = []
    for _ in range(2):
        storage = qg.RedisStorage(redis_server.url, prefix=key_prefix, timeout=5.0)
        backend = MockBackend(tokens_per_second=2000, output_tokens=100)
        gateways.append(
            create_app(config_from(tmp_path, BUDGET_CONFIG), storage=storage, backend=backend)
        )
    async with in_process(gateways[0]) as one, in_process(gateways[1]) as two:
        completions = await concurrent_streams([one, two], 40)
        budget = (await one.get("/v1/ratelimit", headers=KEY)).json()["budgets"][0]
    spent = 2000 - round(float(budget["remaining_usd"]) * 1_000_000)
    assert sum(completions) <= 2000
    assert spent == sum(completions)  # charged exactly what was generated
    assert min(completions) < 100


async def test_concurrent_completions_reserve_what_they_may_use_and_never_overshoot(
    tmp_path: Path,
) -> None:
    """A completion cannot be held as it grows: what its limits allow (up to its max_tokens) is
    reserved before it is sent and is its max_tokens upstream, so 16 at once, each of which
    would answer 500 tokens, generate at most the 1,000 tokens a minute between them; one that
    finds nothing left is refused (with reserve = "max_tokens" every one would be: 4,096
    tokens are more than the limit)."""
    app = create_app(
        config(tmp_path, tokens=1000),
        storage=qg.MemoryStorage(clock=qg.FakeClock()),
        backend=MockBackend(tokens_per_second=5000, output_tokens=500),
    )
    async with in_process(app) as client:
        answers = await asyncio.gather(*(ask(client) for _ in range(16)))
        limits = (await client.get("/v1/ratelimit", headers=KEY)).json()["limits"]
    served = [answer.json()["usage"] for answer in answers if answer.status_code == 200]
    assert {answer.status_code for answer in answers} == {200, 429}
    used = sum(usage["total_tokens"] for usage in served)
    assert used <= 1000
    tokens = next(entry for entry in limits if entry["name"] == "tokens")
    assert tokens["remaining"] == 1000 - used


@pytest.mark.redis
async def test_replicas_on_one_redis_reserve_by_the_clients_answers_on_either(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    """A client's answers on one gateway are its p95 on the other once both have shared what
    they saw (each does every second; here the same call, made at once)."""
    clock = qg.FakeClock(1_000_000.0)
    apps = []
    for _ in range(2):
        storage = qg.RedisStorage(redis_server.url, prefix=key_prefix, clock=clock, timeout=5.0)
        apps.append(
            create_app(config(tmp_path), storage=storage, backend=MockBackend(output_tokens=500))
        )

    async def share() -> None:
        for app in apps:
            gateway = app.state.gateway
            await gateway.estimates.sync(gateway.limiter)

    async with in_process(apps[0]) as one, in_process(apps[1]) as two:
        for _ in range(3):  # 100-token answers on the first gateway
            assert (await ask(one, max_tokens=100)).json()["usage"]["completion_tokens"] == 100
        short = await ask(two, max_tokens=20)  # nothing shared yet: min(20, the tier's 30)
        assert short.json()["usage"]["completion_tokens"] == 20
        left = 100_000 - 3 * (PROMPT + 100) - (PROMPT + 20)
        await share()
        both = await ask(two)  # p95 of 100, 100, 100 and 20: 100, not this gateway's own 20
        assert int(both.headers["x-ratelimit-remaining-tokens"]) == left - (PROMPT + 100)


async def test_an_upstream_error_gives_back_what_was_reserved_since_admission(
    tmp_path: Path,
) -> None:
    """A completion's reservation grown before it was sent, then a 500 upstream: every token of
    it, the grown part too, is given back."""

    async def failing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    upstream = RecordingUpstream(failing)
    app = gateway_app(config(tmp_path, tokens=1000), backend=upstream.backend())
    async with in_process(app) as client:
        assert (await ask(client)).status_code == 502
        limits = (await client.get("/v1/ratelimit", headers=KEY)).json()["limits"]
    assert upstream.bodies[-1]["max_tokens"] == 1000 - PROMPT  # all of it was reserved
    tokens = next(entry for entry in limits if entry["name"] == "tokens")
    assert tokens["remaining"] == 1000

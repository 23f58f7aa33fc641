"""``reserve = "estimate"``: a request reserves the recent p95 of its client's answers rather
than its whole ``max_tokens``, and is held to what its limits still allow while the answer is
produced: a stream ended by the gateway (``finish_reason: "length"``, read by the official
SDK without an exception), a non-streamed request's ``max_tokens`` injected upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai

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

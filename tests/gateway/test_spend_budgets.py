"""Spend budgets at the gateway: a request's cost bound reserved with its other limits in one
call and settled on its real usage, exact in micro-dollars; over budget a 429 saying when the
period resets; a request dearer than the whole budget refused for good; unpriced models."""

from __future__ import annotations

import asyncio
import hashlib
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import quotagate as qg
from helpers import (
    RecordingUpstream,
    chat_prompt,
    config_from,
    error_of,
    gateway_app,
    in_process,
    stream_then_disconnect,
)
from quotagate.gateway.app import create_app
from quotagate.gateway.backends.mock import MockBackend
from quotagate.gateway.config import load_config
from quotagate.testing import async_wait_until
from support import RedisServer

CONFIG = """
[backend]
max_concurrency = 8

[prices."quotagate-mock"]
input = {input}
output = {output}

[tiers.metered]
requests = "1000/minute"
tokens = "1000000/minute"
budget = "{budget}"
unpriced = "{unpriced}"

[[keys]]
key = "sk-acme-0001"
tier = "metered"
"""

KEY = {"X-API-Key": "sk-acme-0001"}
MESSAGES = [{"role": "user", "content": "hi"}]
ANSWER = 24  # the mock's answer, in tokens, when max_tokens does not cut it


def app_for(
    tmp_path: Path,
    clock: qg.FakeClock,
    *,
    budget: str = "$1/day",
    input: str = "0.60",
    output: str = "0.80",
    unpriced: str = "free",
) -> Any:
    text = CONFIG.format(budget=budget, input=input, output=output, unpriced=unpriced)
    return gateway_app(config_from(tmp_path, text), clock=clock)


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


async def ask(client: httpx.AsyncClient, max_tokens: int, **extra: Any) -> httpx.Response:
    body = {"model": "quotagate-mock", "messages": MESSAGES, "max_tokens": max_tokens, **extra}
    return await client.post("/v1/chat/completions", json=body, headers=KEY)


def micro_usd(prompt: int, completion: int, input: int, output: int) -> int:
    """Hand-computed: tokens x micro-dollars per million tokens, over a million, rounded up."""
    return math.ceil((prompt * input + completion * output) / 1_000_000)


async def test_the_cost_bound_is_reserved_and_the_usage_settled_exactly(tmp_path: Path) -> None:
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    prompt = chat_prompt(MESSAGES)
    reserved = micro_usd(prompt, 100, 600_000, 800_000)
    spent = micro_usd(prompt, ANSWER, 600_000, 800_000)
    async with in_process(app_for(tmp_path, clock)) as client:
        first = await ask(client, 100)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] == ANSWER
        assert first.headers["x-quotagate-budget-limit"] == "1.0000"
        # At admission: the whole bound reserved.
        assert first.headers["x-quotagate-budget-remaining"] == f"0.{1_000_000 - reserved:06d}"[:6]
        second = await ask(client, 100)
        # The first settled on what it used; the second's bound reserved.
        left = 1_000_000 - spent - reserved
        assert second.headers["x-quotagate-budget-remaining"] == f"0.{left:06d}"[:6]
        assert second.headers["x-quotagate-budget-reset"] == str(12 * 3600)  # to 00:00 UTC
        # The usual rate-limit headers still show requests and tokens, not micro-dollars.
        assert second.headers["x-ratelimit-limit-requests"] == "1000"
        assert "usd" not in second.headers["ratelimit-policy"]


async def test_over_budget_is_429_budget_exceeded_until_the_day_ends(tmp_path: Path) -> None:
    # $1 per million output tokens: a micro-dollar a generated token, prompts free.
    clock = qg.FakeClock(at(2026, 12, 2, 20, 47, 30))
    app = app_for(tmp_path, clock, budget="$0.0001/day", input="0", output="1")
    async with in_process(app) as client:
        for _ in range(3):  # each reserves 30, settles 24: 72 of 100 spent
            assert (await ask(client, 30)).status_code == 200
        over = await ask(client, 30)  # 72 + 30 > 100
        assert over.status_code == 429
        error = error_of(over.json())
        assert error["code"] == "budget_exceeded"
        assert error["type"] == "insufficient_quota"
        assert error["limit"] == "budget"
        assert error["message"] == ("The $0.0001 daily budget is used up; it resets in 3 h 12 min.")
        assert over.headers["retry-after"] == str(3 * 3600 + 12 * 60 + 30)
        assert error["retry_after"] == 3 * 3600 + 12 * 60 + 30
        assert over.headers["x-quotagate-budget-remaining"] == "0.0000"  # 28 micro-dollars
        assert (await ask(client, 28)).status_code == 200  # what is left still passes
        clock.now = at(2026, 12, 3)  # midnight UTC: a new day, the whole budget again
        assert (await ask(client, 30)).status_code == 200


async def test_a_request_dearer_than_the_whole_budget_can_never_pass(tmp_path: Path) -> None:
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    app = app_for(tmp_path, clock, budget="$0.0001/day", input="0", output="1")
    async with in_process(app) as client:
        refused = await ask(client, 101)
        assert refused.status_code == 429
        error = error_of(refused.json())
        assert error["code"] == "request_too_large"
        assert "retry-after" not in refused.headers
        assert "budget" in error["message"]
        assert (await ask(client, 100)).status_code == 200  # nothing was spent by it


async def test_an_unpriced_model_is_free_or_refused_as_the_tier_says(tmp_path: Path) -> None:
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    text = CONFIG.format(budget="$1/day", input="1", output="1", unpriced="refuse").replace(
        '[prices."quotagate-mock"]', '[prices."another-model"]'
    )
    async with in_process(gateway_app(config_from(tmp_path, text), clock=clock)) as client:
        refused = await ask(client, 10)
        assert refused.status_code == 400
        assert error_of(refused.json())["code"] == "model_not_priced"
    text = text.replace('unpriced = "refuse"', 'unpriced = "free"')
    async with in_process(gateway_app(config_from(tmp_path, text), clock=clock)) as client:
        free = await ask(client, 10)
        assert free.status_code == 200
        assert free.headers["x-quotagate-budget-remaining"] == "1.0000"  # cost nothing


async def test_an_upstream_error_refunds_the_whole_reservation(tmp_path: Path) -> None:
    async def failing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    clock = qg.FakeClock(at(2026, 12, 2, 12))
    text = CONFIG.format(budget="$1/day", input="0.60", output="0.80", unpriced="free")
    backend = RecordingUpstream(failing).backend()
    app = gateway_app(config_from(tmp_path, text), clock=clock, backend=backend)
    async with in_process(app) as client:
        assert (await ask(client, 100)).status_code == 502
        budgets = (await client.get("/v1/ratelimit", headers=KEY)).json()["budgets"]
    assert budgets == [
        {
            "period": "day",
            "limit_usd": "1.0000",
            "remaining_usd": "1.0000",  # nothing spent: all given back
            "reset_after": 12 * 3600.0,
            "resets_at": "2026-12-03T00:00:00Z",
        }
    ]


async def test_ratelimit_shows_each_budget_with_its_period_and_reset(tmp_path: Path) -> None:
    clock = qg.FakeClock(at(2026, 2, 27, 18))
    app = app_for(tmp_path, clock, budget="$0.0001/day; $0.001/month", input="0", output="1")
    async with in_process(app) as client:
        assert (await ask(client, 30)).status_code == 200  # settles at 24
        body = (await client.get("/v1/ratelimit", headers=KEY)).json()
    assert [b["period"] for b in body["budgets"]] == ["day", "month"]
    day, month = body["budgets"]
    assert (day["remaining_usd"], month["remaining_usd"]) == ("0.0000", "0.0009")
    assert day["resets_at"] == "2026-02-28T00:00:00Z"
    assert month["resets_at"] == "2026-03-01T00:00:00Z"  # February's end, not 30 days on
    assert month["reset_after"] == 30 * 3600.0
    assert all(entry["name"] != "budget" for entry in body["limits"])


@pytest.mark.redis
async def test_200_concurrent_requests_over_two_replicas_never_overshoot_a_budget_of_50(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    """Two gateways on one Redis; every request held upstream until all 200 were decided: the
    budget admits exactly the 50 its reservations fit, and after the answers what was spent is
    within it (each settled on its usage, below its reservation)."""
    # $1 per million output tokens: a micro-dollar a generated token; 30 reserved a request.
    text = CONFIG.format(budget="$0.0015/day", input="0", output="1", unpriced="free")
    text = text.replace("max_concurrency = 8", "max_concurrency = 200")
    text = text.replace('requests = "1000/minute"', 'requests = "10000/minute"')
    upstream = RecordingUpstream(hold=True)
    gateways = []
    for _ in range(2):
        storage = qg.RedisStorage(redis_server.url, prefix=key_prefix, timeout=5.0)
        config = config_from(tmp_path, text)
        gateways.append(gateway_app(config, storage, backend=upstream.backend()))
    async with in_process(gateways[0]) as one, in_process(gateways[1]) as two:
        asks = [asyncio.create_task(ask((one, two)[i % 2], 30)) for i in range(200)]
        async with asyncio.timeout(60):  # Redis round trips: real time, however busy
            while upstream.waiting + sum(t.done() for t in asks) < 200:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        refused = [t.result() for t in asks if t.done()]
        assert upstream.waiting == 50  # 50 x 30 = 1500 micro-dollars reserved: all there is
        assert len(refused) == 150
        assert {error_of(r.json())["code"] for r in refused} == {"budget_exceeded"}
        upstream.release.set()
        answers = await asyncio.gather(*asks)
        assert sum(a.status_code == 200 for a in answers) == 50
        left = (await one.get("/v1/ratelimit", headers=KEY)).json()["budgets"][0]
    assert left["remaining_usd"] == "0.0003"  # 1500 - 50 x 24 generated: never below zero


async def test_the_usage_ledger_counts_what_each_answer_cost(tmp_path: Path) -> None:
    admin = "adm-0123456789abcdef"
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    text = CONFIG.format(budget="$1/day", input="0.60", output="0.80", unpriced="free")
    text += f'\n[admin]\nkey_sha256 = ["{hashlib.sha256(admin.encode()).hexdigest()}"]\n'
    prompt = chat_prompt(MESSAGES)
    async with in_process(gateway_app(config_from(tmp_path, text), clock=clock)) as client:
        assert (await ask(client, 100)).status_code == 200
        streamed = await ask(client, 5, stream=True)
        assert streamed.status_code == 200
        answer = await client.get(
            "/admin/usage",
            params={"group_by": "model"},
            headers={"Authorization": f"Bearer {admin}"},
        )
    (row,) = answer.json()["data"]
    each = [micro_usd(prompt, ANSWER, 600_000, 800_000), micro_usd(prompt, 5, 600_000, 800_000)]
    assert row["cost_usd"] == sum(each) / 1_000_000
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2 * prompt, ANSWER + 5)


async def test_a_reload_that_changes_the_budget_keeps_what_was_spent(tmp_path: Path) -> None:
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(budget="$0.0001/day", input="0", output="1", unpriced="free"))
    storage = qg.MemoryStorage(clock=clock)
    app = create_app(load_config(path, environ={}), storage=storage, config_path=str(path))
    async with in_process(app) as client:
        for _ in range(3):
            assert (await ask(client, 30)).status_code == 200  # 72 spent
        path.write_text(CONFIG.format(budget="$0.0002/day", input="0", output="1", unpriced="free"))
        assert app.state.gateway.reload()
        raised = await ask(client, 30)
        assert raised.headers["x-quotagate-budget-limit"] == "0.0002"
        assert raised.headers["x-quotagate-budget-remaining"] == "0.0000"  # 200 - 72 - 30 = 98
        path.write_text(
            CONFIG.format(budget="$0.00009/day", input="0", output="1", unpriced="free")
        )
        assert app.state.gateway.reload()
        lowered = await ask(client, 30)  # 96 spent of 90 now: over
    assert lowered.status_code == 429
    assert error_of(lowered.json())["code"] == "budget_exceeded"


async def test_a_keys_own_budget_through_the_admin_api_keeps_what_was_spent(
    tmp_path: Path,
) -> None:
    admin = "adm-0123456789abcdef"
    auth = {"Authorization": f"Bearer {admin}"}
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    text = CONFIG.format(budget="$1/day", input="0", output="1", unpriced="free")
    text += f'\n[admin]\nkey_sha256 = ["{hashlib.sha256(admin.encode()).hexdigest()}"]\n'
    async with in_process(gateway_app(config_from(tmp_path, text), clock=clock)) as client:
        made = await client.post(
            "/admin/keys",
            json={"tier": "metered", "limits": {"budget": "$0.0001/day"}},
            headers=auth,
        )
        assert made.status_code == 201, made.text
        key = {"X-API-Key": made.json()["key"]}
        body = {"model": "quotagate-mock", "messages": MESSAGES, "max_tokens": 30}
        for _ in range(3):
            sent = await client.post("/v1/chat/completions", json=body, headers=key)
            assert sent.status_code == 200
            assert sent.headers["x-quotagate-budget-limit"] == "0.0001"
        over = await client.post("/v1/chat/completions", json=body, headers=key)
        assert over.status_code == 429  # 72 + 30 > 100
        patched = await client.patch(
            f"/admin/keys/{made.json()['id']}",
            json={"limits": {"budget": "$0.0002/day"}},
            headers=auth,
        )
        assert patched.status_code == 200, patched.text
        again = await client.post("/v1/chat/completions", json=body, headers=key)
        assert again.status_code == 200
        assert again.headers["x-quotagate-budget-remaining"] == "0.0000"  # 200 - 72 - 30 = 98
        bad = await client.patch(
            f"/admin/keys/{made.json()['id']}",
            json={"limits": {"budget": "5 dollars"}},
            headers=auth,
        )
        assert bad.status_code == 400


async def test_a_stream_is_charged_its_usage_and_a_client_gone_what_was_generated(
    tmp_path: Path,
) -> None:
    # $100 per million output tokens: 100 micro-dollars a token, one in the headers' 4 decimals.
    clock = qg.FakeClock(at(2026, 12, 2, 12))
    text = CONFIG.format(budget="$1/day", input="0", output="100", unpriced="free")
    config = config_from(tmp_path, text)
    app = create_app(
        config, storage=qg.MemoryStorage(clock=clock), backend=MockBackend(tokens_per_second=50)
    )
    body = {"model": "quotagate-mock", "messages": MESSAGES, "max_tokens": 100, "stream": True}

    async def remaining(client: httpx.AsyncClient) -> int:
        shown = (await client.get("/v1/ratelimit", headers=KEY)).json()["budgets"][0]
        return round(float(shown["remaining_usd"]) * 1_000_000)

    async with in_process(app) as client:
        streamed = await client.post(
            "/v1/chat/completions",
            json={**body, "stream_options": {"include_usage": True}, "max_tokens": 10},
            headers=KEY,
        )
        assert streamed.text.endswith("data: [DONE]\n\n")
        assert await remaining(client) == 1_000_000 - 10 * 100  # its usage: 10 tokens
        received = await stream_then_disconnect(
            app, "/v1/chat/completions", body, "sk-acme-0001", events=4
        )
        assert b"[DONE]" not in b"".join(received)

        async def settled() -> bool:
            return await remaining(client) > 1_000_000 - 1_000 - 100 * 100  # not the bound

        await async_wait_until(settled, 10, "the stream is settled")
        charged = 1_000_000 - 1_000 - await remaining(client)
    assert 3 * 100 <= charged < ANSWER * 100  # what was generated before it left, not 100

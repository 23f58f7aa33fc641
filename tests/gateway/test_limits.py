"""Per-request limits decided in one storage call: requests, tokens, concurrency and per-model
limits, all or nothing; the output cap; token reconciliation with exact numbers; shadow mode;
the headers and the 429 bodies. In process, on memory and real Redis, with a fake clock."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import quotagate as qg
from helpers import (
    ALICE,
    BASE_CONFIG,
    BOB,
    CAROL,
    NATURAL_LENGTH,
    RecordingUpstream,
    base_config,
    chat_prompt,
    completion_prompt,
    config_from,
    error_code,
    error_of,
    gateway_app,
    in_process,
    limits_of,
    until,
)

PROMPT = "Say hi"
P = completion_prompt(PROMPT)
FREE_TOKENS = 600
RESET = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+s)$")


def _complete(**extra: Any) -> dict[str, Any]:
    return {"model": "quotagate-mock", "prompt": PROMPT, **extra}


def _assert_seed_429(response: httpx.Response, limit: str) -> int:
    """The seed's 429 in OpenAI's shape (with ``limit``), Retry-After and retry-after-ms;
    returns the seconds."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    seconds = int(response.headers["retry-after"])
    assert seconds >= 1
    assert response.json() == {
        "error": {
            "message": f"Too many requests. Try again in {seconds} seconds.",
            "type": "tokens" if limit == "tokens" else "requests",
            "code": "rate_limit_exceeded",
            "param": None,
            "retry_after": seconds,
            "limit": limit,
        }
    }
    millis = response.headers["retry-after-ms"]
    assert millis.isdigit()
    assert math.ceil(int(millis) / 1000) == seconds
    return seconds


# -- requests, tokens, concurrency: all or nothing ------------------------------------------


async def test_requests_limit_429_and_tokens_and_slot_untouched(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        ok = [
            await client.post("/v1/completions", json=_complete(), headers={"X-API-Key": ALICE})
            for _ in range(3)
        ]
        before = await limits_of(client, ALICE)
        over = await client.post("/v1/completions", json=_complete(), headers={"X-API-Key": ALICE})
        after = await limits_of(client, ALICE)
    assert [r.status_code for r in ok] == [200] * 3
    assert _assert_seed_429(over, "requests") == 20  # 3/minute: one every 20 s
    assert before["tokens"]["remaining"] == FREE_TOKENS - 3 * (P + NATURAL_LENGTH)
    assert after["tokens"] == before["tokens"]  # the rejected request reserved no tokens
    assert after["concurrency"]["remaining"] == 1  # and holds no slot


async def test_tokens_limit_429_charges_no_request(tmp_path: Path, storage: qg.Storage) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        first = await client.post(
            "/v1/completions", json=_complete(max_tokens=500), headers={"X-API-Key": ALICE}
        )
        left = FREE_TOKENS - (P + NATURAL_LENGTH)  # settled on the real usage
        over = await client.post(
            "/v1/completions",
            json=_complete(max_tokens=left - P + 1),  # one token more than is left
            headers={"X-API-Key": ALICE},
        )
        state = await limits_of(client, ALICE)
    assert first.status_code == 200
    seconds = _assert_seed_429(over, "tokens")
    assert seconds == 1  # one token short at 10 tokens/s
    assert state["requests"]["remaining"] == 2  # only the first request was charged
    assert state["tokens"]["remaining"] == left
    assert state["concurrency"]["remaining"] == 1


async def test_concurrency_429_charges_no_request_and_no_tokens(
    tmp_path: Path, storage: qg.Storage
) -> None:
    upstream = RecordingUpstream(hold=True)
    app = gateway_app(base_config(tmp_path), storage, backend=upstream.backend())
    async with in_process(app) as client:
        held = asyncio.create_task(
            client.post(
                "/v1/completions", json=_complete(max_tokens=30), headers={"X-API-Key": ALICE}
            )
        )
        await upstream.entered.wait()
        during = await limits_of(client, ALICE)
        over = await client.post(
            "/v1/completions", json=_complete(max_tokens=30), headers={"X-API-Key": ALICE}
        )
        after_rejection = await limits_of(client, ALICE)
        upstream.release.set()
        first = await held
        again = await client.post(
            "/v1/completions", json=_complete(max_tokens=30), headers={"X-API-Key": ALICE}
        )
    assert first.status_code == 200
    _assert_seed_429(over, "concurrency")
    assert during["concurrency"]["remaining"] == 0
    assert during["tokens"]["remaining"] == FREE_TOKENS - (P + 30)
    assert after_rejection["requests"] == during["requests"]
    assert after_rejection["tokens"] == during["tokens"]
    assert again.status_code == 200  # the slot came back with the first answer


async def test_a_rejection_reports_what_is_really_left(tmp_path: Path, storage: qg.Storage) -> None:
    """Headers carry values as of the decision; a rejected decision consumed nothing, so a 429
    must not report a request or a slot as used."""
    app = gateway_app(base_config(tmp_path), storage)
    headers = {"X-API-Key": CAROL}
    async with in_process(app) as client:
        await client.post("/v1/completions", json=_complete(max_tokens=500), headers=headers)
        left = FREE_TOKENS - (P + NATURAL_LENGTH)
        over = await client.post(
            "/v1/completions", json=_complete(max_tokens=left), headers=headers
        )
        state = await limits_of(client, CAROL)
    _assert_seed_429(over, "tokens")
    assert state["requests"]["remaining"] == 2
    assert state["concurrency"]["remaining"] == 1
    assert over.headers["x-ratelimit-remaining-requests"] == "2"
    assert over.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert '"3-per-minute";r=2;' in over.headers["ratelimit"]
    assert '"1-concurrent";r=1;' in over.headers["ratelimit"]


async def test_a_request_larger_than_the_whole_capacity_is_request_too_large(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions", json=_complete(max_tokens=FREE_TOKENS), headers={"X-API-Key": ALICE}
        )
        state = await limits_of(client, ALICE)
    assert response.status_code == 429
    body = response.json()
    assert error_code(body) == "request_too_large"
    assert error_of(body)["limit"] == "tokens"
    assert error_of(body)["message"]
    assert "retry-after" not in response.headers
    assert "retry-after-ms" not in response.headers
    assert state["requests"]["remaining"] == 3
    assert state["tokens"]["remaining"] == FREE_TOKENS


async def test_too_large_counts_n_times_the_cap(tmp_path: Path) -> None:
    app = gateway_app(base_config(tmp_path))
    async with in_process(app) as client:
        fits = await client.post(
            "/v1/completions", json=_complete(max_tokens=100, n=5), headers={"X-API-Key": BOB}
        )
        response = await client.post(
            "/v1/completions", json=_complete(max_tokens=210, n=3), headers={"X-API-Key": ALICE}
        )
    assert fits.status_code == 200
    assert response.status_code == 429  # (2 + 210) * 3 = 636 > 600
    assert error_code(response.json()) == "request_too_large"


# -- the output cap and reconciliation --------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "cap", "n"),
    [
        ("completions", {"prompt": PROMPT, "max_tokens": 100}, 100, 1),
        ("completions", {"prompt": PROMPT, "max_tokens": 10}, 10, 1),
        ("completions", {"prompt": PROMPT, "max_tokens": 40, "n": 3}, 40, 3),
        ("completions", {"prompt": PROMPT}, 200, 1),  # pro's default_max_tokens
        ("chat", {"messages": [{"role": "user", "content": "Hello!"}]}, 200, 1),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Hello!"}], "max_completion_tokens": 30},
            30,
            1,
        ),
    ],
)
async def test_reserve_the_bound_then_settle_on_the_real_usage(
    tmp_path: Path,
    storage: qg.Storage,
    route: str,
    body: dict[str, Any],
    cap: int,
    n: int,
) -> None:
    capacity = 100_000  # pro
    prompt = chat_prompt(body["messages"]) if route == "chat" else P
    app = gateway_app(base_config(tmp_path), storage)
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    async with in_process(app) as client:
        response = await client.post(path, json=body, headers={"X-API-Key": BOB})
        state = await limits_of(client, BOB)
    assert response.status_code == 200, response.text
    reserved = (prompt + cap) * n
    assert response.headers["x-ratelimit-remaining-tokens"] == str(capacity - reserved)
    usage = response.json()["usage"]
    assert usage["total_tokens"] == prompt + min(cap, NATURAL_LENGTH) * n
    assert state["tokens"]["remaining"] == capacity - usage["total_tokens"]


async def test_default_max_tokens_is_injected_upstream_only_when_no_cap_is_set(
    tmp_path: Path, storage: qg.Storage
) -> None:
    upstream = RecordingUpstream()
    app = gateway_app(base_config(tmp_path), storage, backend=upstream.backend())
    headers = {"X-API-Key": BOB}
    async with in_process(app) as client:
        plain = await client.post(
            "/v1/completions", json=_complete(temperature=0.5, top_k=3), headers=headers
        )
        capped = await client.post("/v1/completions", json=_complete(max_tokens=7), headers=headers)
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9},
            headers=headers,
        )
    assert [r.status_code for r in (plain, capped, chat)] == [200, 200, 200]
    first, second, third = upstream.bodies
    assert first == {
        "model": "quotagate-mock",
        "prompt": PROMPT,
        "temperature": 0.5,
        "top_k": 3,
        "max_tokens": 200,  # pro's default_max_tokens, so the reservation is a true bound
    }
    assert plain.headers["x-ratelimit-remaining-tokens"] == str(100_000 - (P + 200))
    assert second["max_tokens"] == 7
    assert third["max_completion_tokens"] == 9
    assert "max_tokens" not in third


async def test_usage_from_the_upstream_settles_exactly_even_if_far_from_the_estimate(
    tmp_path: Path, storage: qg.Storage
) -> None:
    async def answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        usage = {"prompt_tokens": 77, "completion_tokens": 23, "total_tokens": 100}
        choice = {"index": 0, "text": "whatever", "finish_reason": "stop"}
        return httpx.Response(
            200, json={"object": "text_completion", "choices": [choice], "usage": usage}
        )

    upstream = RecordingUpstream(answer)
    app = gateway_app(base_config(tmp_path), storage, backend=upstream.backend())
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions", json=_complete(max_tokens=300), headers={"X-API-Key": BOB}
        )
        state = await limits_of(client, BOB)
    assert response.status_code == 200
    assert state["tokens"]["remaining"] == 100_000 - 100


# -- per-model limits ---------------------------------------------------------------------------


MODEL_LIMITS = """
[tiers.free.models."llama-3-70b"]
requests = "1/minute"

[tiers.free.models."big-model"]
tokens = "100/minute"
"""


async def test_a_per_model_request_limit_is_checked_in_the_same_call(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path, extra=MODEL_LIMITS), storage)
    headers = {"X-API-Key": ALICE}
    async with in_process(app) as client:
        first = await client.post(
            "/v1/completions", json=_complete(model="llama-3-70b"), headers=headers
        )
        second = await client.post(
            "/v1/completions", json=_complete(model="llama-3-70b"), headers=headers
        )
        state = await limits_of(client, ALICE)
        other = await client.post("/v1/completions", json=_complete(), headers=headers)
    assert first.status_code == 200
    _assert_seed_429(second, "requests")
    assert state["requests"]["remaining"] == 2  # the model's rejection cost no tier request
    assert state["tokens"]["remaining"] == FREE_TOKENS - (P + NATURAL_LENGTH)
    assert other.status_code == 200  # other models are not limited by it


async def test_a_per_model_token_limit_reserves_and_settles(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path, extra=MODEL_LIMITS), storage)
    headers = {"X-API-Key": ALICE}
    body = _complete(model="big-model", max_tokens=60)  # reserves 62 of the model's 100
    async with in_process(app) as client:
        first = await client.post("/v1/completions", json=body, headers=headers)
        # Settled to 2 + 24 = 26: 74 left, so a second 62-token reservation fits.
        second = await client.post("/v1/completions", json=body, headers=headers)
        third = await client.post("/v1/completions", json=body, headers=headers)
        too_big = await client.post(
            "/v1/completions", json=_complete(model="big-model", max_tokens=99), headers=headers
        )
        state = await limits_of(client, ALICE)
    assert [first.status_code, second.status_code] == [200, 200]
    _assert_seed_429(third, "tokens")  # 100 - 52 = 48 < 62
    assert too_big.status_code == 429
    assert error_code(too_big.json()) == "request_too_large"
    assert state["requests"]["remaining"] == 1  # neither rejection cost a tier request
    assert state["tokens"]["remaining"] == FREE_TOKENS - 2 * (P + NATURAL_LENGTH)


# -- shadow mode --------------------------------------------------------------------------------


async def test_global_shadow_counts_and_reports_but_denies_nothing(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path, top="shadow = true"), storage)
    async with in_process(app) as client:
        responses = [
            await client.post("/v1/completions", json=_complete(), headers={"X-API-Key": ALICE})
            for _ in range(5)
        ]
        state = await limits_of(client, ALICE)
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == [
        "2",
        "1",
        "0",
        "0",
        "0",
    ]
    assert state["requests"]["remaining"] == 0  # counted all the same
    assert state["tokens"]["remaining"] == FREE_TOKENS - 5 * (P + NATURAL_LENGTH)
    assert 'quotagate_shadow_rejections_total{limit="requests",tier="free"} 2.0' in metrics


async def test_shadow_per_tier_leaves_other_tiers_enforced(
    tmp_path: Path, storage: qg.Storage
) -> None:
    text = BASE_CONFIG.format(top="", extra="")
    text = text.replace("[tiers.free]\n", "[tiers.free]\nshadow = true\n")
    text = text.replace('requests = "100/minute"', 'requests = "2/minute"')  # pro
    app = gateway_app(config_from(tmp_path, text), storage)
    async with in_process(app) as client:
        free = [
            await client.post("/v1/completions", json=_complete(), headers={"X-API-Key": ALICE})
            for _ in range(4)
        ]
        pro = [
            await client.post("/v1/completions", json=_complete(), headers={"X-API-Key": BOB})
            for _ in range(3)
        ]
    assert [r.status_code for r in free] == [200] * 4
    assert [r.status_code for r in pro] == [200, 200, 429]


async def test_shadow_admits_a_concurrency_overflow(tmp_path: Path) -> None:
    upstream = RecordingUpstream(hold=True)
    config = base_config(tmp_path, top="shadow = true")
    app = gateway_app(config, backend=upstream.backend())
    async with in_process(app) as client:
        tasks = [
            asyncio.create_task(
                client.post("/v1/completions", json=_complete(), headers={"X-API-Key": ALICE})
            )
            for _ in range(2)
        ]
        await until(lambda: upstream.waiting == 2)  # both reached the model, limit 1
        upstream.release.set()
        responses = await asyncio.gather(*tasks)
        state = await limits_of(client, ALICE)
    assert [r.status_code for r in responses] == [200, 200]
    assert state["concurrency"]["remaining"] == 1


# -- headers ------------------------------------------------------------------------------------


HEADERS_CONFIG = """
[tiers.hourly]
requests = "10/hour"
tokens = "600/minute"
concurrency = 2
default_max_tokens = 50

[[keys]]
key = "sk-hourly-0001"
tier = "hourly"
"""


async def test_every_header_family_on_an_admitted_request(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(config_from(tmp_path, HEADERS_CONFIG), storage)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions", json={"prompt": PROMPT}, headers={"X-API-Key": "sk-hourly-0001"}
        )
    assert response.status_code == 200
    h = response.headers
    reserved = P + 50
    # OpenAI's, as of the admission decision (the reservation, before settlement).
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-reset-requests"] == "6m0s"
    assert h["x-ratelimit-limit-tokens"] == "600"
    assert h["x-ratelimit-remaining-tokens"] == str(600 - reserved)
    assert h["x-ratelimit-reset-tokens"] == f"{math.ceil(reserved / 10)}s"
    # The library's HTTP contract.
    assert h["x-ratelimit-limit"] in ("10", "600")
    assert int(h["x-ratelimit-reset"]) >= 1
    policy = h["ratelimit-policy"]
    assert '"10-per-hour";q=10;w=3600' in policy
    assert '"600-per-minute";q=600;w=60' in policy
    assert '"10-per-hour";r=9;t=360' in h["ratelimit"]
    assert f'"600-per-minute";r={600 - reserved};' in h["ratelimit"]
    assert "retry-after" not in h


async def test_openai_headers_on_a_429(tmp_path: Path) -> None:
    app = gateway_app(config_from(tmp_path, HEADERS_CONFIG))
    headers = {"X-API-Key": "sk-hourly-0001"}
    async with in_process(app) as client:
        for _ in range(10):
            await client.post("/v1/completions", json=_complete(max_tokens=1), headers=headers)
        over = await client.post("/v1/completions", json=_complete(max_tokens=1), headers=headers)
    assert _assert_seed_429(over, "requests") == 360
    assert over.headers["retry-after-ms"] == "360000"
    assert over.headers["x-ratelimit-limit-requests"] == "10"
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-reset-requests"] == "1h0m0s"
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert RESET.match(over.headers[name]), over.headers[name]
    assert over.headers["ratelimit-policy"]
    assert over.headers["ratelimit"]

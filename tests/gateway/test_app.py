"""The gateway's endpoints and callers, in process (httpx.ASGITransport, lifespan running),
on memory and on real Redis, with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

import quotagate as qg
from helpers import (
    ALICE,
    BOB,
    NATURAL_LENGTH,
    base_config,
    chat_prompt,
    completion_prompt,
    config_from,
    error_code,
    gateway_app,
    in_process,
    limits_of,
    metric_samples,
    mock_text,
    sample,
)
from quotagate.gateway.app import create_app
from support import free_port


async def test_completion_answers_like_openai(tmp_path: Path, storage: qg.Storage) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions",
            json={"model": "quotagate-mock", "prompt": "Say hi", "max_tokens": 5},
            headers={"X-API-Key": ALICE},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "quotagate-mock"
    assert body["choices"][0]["text"] == "".join(mock_text(5))
    assert body["choices"][0]["finish_reason"] == "length"
    prompt = completion_prompt("Say hi")
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 5,
        "total_tokens": prompt + 5,
    }


async def test_chat_completion_answers_like_openai(tmp_path: Path, storage: qg.Storage) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "quotagate-mock", "messages": messages},
            headers={"Authorization": f"Bearer {BOB}"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "".join(mock_text(NATURAL_LENGTH)),
    }
    prompt = chat_prompt(messages)
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["total_tokens"] == prompt + NATURAL_LENGTH


async def test_models_lists_the_mock_model(tmp_path: Path) -> None:
    async with in_process(gateway_app(base_config(tmp_path))) as client:
        response = await client.get("/v1/models", headers={"X-API-Key": ALICE})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert "quotagate-mock" in [model["id"] for model in body["data"]]


async def test_health_reports_status_storage_and_version(
    tmp_path: Path, storage: qg.Storage
) -> None:
    async with in_process(gateway_app(base_config(tmp_path), storage)) as client:
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "storage": "redis" if isinstance(storage, qg.RedisStorage) else "memory",
        "version": qg.__version__,
        "backends": {"default": {"replicas": 1, "healthy": 1, "in_flight": 0, "queued": 0}},
    }


async def test_health_has_its_own_limit_per_client(tmp_path: Path) -> None:
    config = base_config(tmp_path, extra='[health]\nrequests = "2/minute"\n')
    async with in_process(gateway_app(config)) as client:
        statuses = [(await client.get("/health")).status_code for _ in range(2)]
        over = await client.get("/health")
        other = await client.get("/health", headers={"X-API-Key": ALICE})
        anonymous = await limits_of(client)
    assert statuses == [200, 200]
    assert over.status_code == 429
    assert over.json() == {
        "error": {
            "message": "Too many requests. Try again in 30 seconds.",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
            "retry_after": 30,
            "limit": "health",
        }
    }
    assert over.headers["retry-after"] == "30"
    assert other.status_code == 200  # another client
    assert anonymous["requests"]["remaining"] == 5  # health checks cost no inference request


async def test_docs_and_openapi(tmp_path: Path) -> None:
    async with in_process(gateway_app(base_config(tmp_path))) as client:
        docs = await client.get("/docs")
        schema = await client.get("/openapi.json")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    paths = schema.json()["paths"]
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/ratelimit",
        "/health",
    ):
        assert path in paths, path


async def test_x_api_key_and_bearer_are_the_same_caller(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        first = await client.post(
            "/v1/completions", json={"prompt": "a"}, headers={"X-API-Key": ALICE}
        )
        second = await client.post(
            "/v1/completions", json={"prompt": "a"}, headers={"Authorization": f"Bearer {ALICE}"}
        )
        state = await limits_of(client, ALICE)
    assert [first.status_code, second.status_code] == [200, 200]
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert second.headers["x-ratelimit-remaining-requests"] == "1"
    assert state["tier"] == "free"
    assert state["requests"]["remaining"] == 1


async def test_a_key_configured_by_sha256_only(tmp_path: Path) -> None:
    async with in_process(gateway_app(base_config(tmp_path))) as client:
        state = await limits_of(client, BOB)
    assert state["tier"] == "pro"
    assert state["requests"]["limit"] == 100


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
async def test_an_unknown_key_is_401_invalid_api_key(
    tmp_path: Path, storage: qg.Storage, header: str
) -> None:
    value = "sk-nobody-9999" if header == "X-API-Key" else "Bearer sk-nobody-9999"
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={header: value},
        )
        anonymous = await limits_of(client)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert error_code(response.json()) == "invalid_api_key"
    assert anonymous["requests"]["remaining"] == 5  # not served as anonymous either


async def test_no_key_is_the_anonymous_tier_by_client_ip(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app, client=("203.0.113.7", 1000)) as first:
        responses = [await first.post("/v1/completions", json={"prompt": "x"}) for _ in range(5)]
        over = await first.post("/v1/completions", json={"prompt": "x"})
        state = await limits_of(first)
    async with in_process(app, client=("203.0.113.8", 1000)) as second:
        other = await second.post("/v1/completions", json={"prompt": "x"})
    assert [r.status_code for r in responses] == [200] * 5
    assert over.status_code == 429
    assert state["tier"] == "anonymous"
    assert state["requests"]["remaining"] == 0
    assert other.status_code == 200  # another IP, another bucket
    assert other.headers["x-ratelimit-remaining-requests"] == "4"


async def test_no_key_without_an_anonymous_table_is_401(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        '[tiers.free]\nrequests = "5/minute"\n[[keys]]\nkey = "sk-k-1234"\ntier = "free"\n',
    )
    async with in_process(gateway_app(config)) as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
        with_key = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": "sk-k-1234"}
        )
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()
    assert with_key.status_code == 200


async def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path: Path) -> None:
    config = base_config(tmp_path, extra='[server]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    app = gateway_app(config)
    async with in_process(app, client=("10.1.1.1", 1000)) as proxy:
        a = await proxy.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.1"}
        )
        b = await proxy.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.2"}
        )
    async with in_process(app, client=("192.0.2.50", 1000)) as untrusted:
        c = await untrusted.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.1"}
        )
        d = await untrusted.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": "198.51.100.9"}
        )
    remaining = [r.headers["x-ratelimit-remaining-requests"] for r in (a, b, c, d)]
    # a and b: two clients behind the proxy; c and d: one untrusted peer, whatever it claims.
    assert remaining == ["4", "4", "4", "3"]


async def test_ratelimit_endpoint_shows_tier_and_every_limit(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = gateway_app(base_config(tmp_path), storage)
    async with in_process(app) as client:
        await client.post(
            "/v1/completions",
            json={"prompt": "Say hi", "max_tokens": 10},
            headers={"X-API-Key": ALICE},
        )
        response = await client.get("/v1/ratelimit", headers={"X-API-Key": ALICE})
    assert response.status_code == 200
    body = response.json()
    assert body["tier"] == "free"
    by_name = {entry["name"]: entry for entry in body["limits"]}
    assert set(by_name) == {"requests", "tokens", "concurrency"}
    for entry in body["limits"]:
        assert {"limit", "remaining", "reset_after"} <= set(entry)
    assert (by_name["requests"]["limit"], by_name["requests"]["remaining"]) == (3, 2)
    assert by_name["requests"]["reset_after"] == pytest.approx(20.0)
    used = completion_prompt("Say hi") + 10
    assert (by_name["tokens"]["limit"], by_name["tokens"]["remaining"]) == (600, 600 - used)
    assert by_name["tokens"]["reset_after"] == pytest.approx(used * 0.1)
    assert (by_name["concurrency"]["limit"], by_name["concurrency"]["remaining"]) == (1, 1)


async def test_health_says_fallback_while_redis_is_unreachable(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    config = base_config(tmp_path, extra=f'[storage]\nurl = "{dead}"\ntimeout_ms = 50\n')
    app = create_app(config)  # the storage the config names: Redis, memory while it is down
    async with in_process(app) as client:
        health = await client.get("/health")
        answer = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": ALICE}
        )
        metrics = metric_samples((await client.get("/metrics")).text)
    assert health.json() == {
        "status": "ok",
        "storage": "fallback",
        "version": qg.__version__,
        "backends": {"default": {"replicas": 1, "healthy": 1, "in_flight": 0, "queued": 0}},
    }
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-requests"] == "2"  # still limited, in memory
    assert sample(metrics, "quotagate_storage_mode", mode="fallback") == 1

"""``GET /metrics``: Prometheus text with requests by tier, route and status; rejections by
limit kind; tokens reserved, charged and refunded; storage mode; decision latency; in-flight per
tier. Never a label holding an API key or an IP address."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import quotagate as qg
from helpers import (
    ALICE,
    BASE_CONFIG,
    BOB,
    NATURAL_LENGTH,
    RecordingUpstream,
    base_config,
    completion_prompt,
    config_from,
    gateway_app,
    in_process,
    metric_samples,
    sample,
)

ANONYMOUS_IP = "203.0.113.77"


async def test_counters_by_tier_route_status_and_limit(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    app = gateway_app(base_config(tmp_path), backend=upstream.backend())
    alice = {"X-API-Key": ALICE}
    prompt = completion_prompt("Say hi")
    async with in_process(app, client=(ANONYMOUS_IP, 4000)) as client:
        ok = await client.post(
            "/v1/completions", json={"prompt": "Say hi", "max_tokens": 100}, headers=alice
        )
        too_many_tokens = await client.post(
            "/v1/completions", json={"prompt": "Say hi", "max_tokens": 590}, headers=alice
        )
        await client.post("/v1/completions", json={"prompt": "x"}, headers=alice)
        await client.post("/v1/completions", json={"prompt": "x"}, headers=alice)
        too_many_requests = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers=alice
        )
        chat = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        response = await client.get("/metrics")
    assert ok.status_code == 200
    assert too_many_tokens.status_code == 429
    assert too_many_requests.status_code == 429
    assert chat.status_code == 200
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = metric_samples(response.text)
    requests = "quotagate_requests_total"
    assert sample(m, requests, tier="free", route="completions", status="200") == 3
    assert sample(m, requests, tier="free", route="completions", status="429") == 2
    assert sample(m, requests, tier="anonymous", route="chat", status="200") == 1
    assert sample(m, "quotagate_rejections_total", tier="free", limit="tokens") == 1
    assert sample(m, "quotagate_rejections_total", tier="free", limit="requests") == 1
    # Tokens, exactly: reserved = (prompt + cap), charged = usage, refunded = the difference.
    first = (prompt + 100, prompt + NATURAL_LENGTH)
    cheap = completion_prompt("x")
    second = (cheap + 50, cheap + NATURAL_LENGTH)  # free's default_max_tokens
    reserved = first[0] + 2 * second[0]
    charged = first[1] + 2 * second[1]
    assert sample(m, "quotagate_tokens_total", tier="free", kind="reserved") == reserved
    assert sample(m, "quotagate_tokens_total", tier="free", kind="charged") == charged
    assert sample(m, "quotagate_tokens_total", tier="free", kind="refunded") == reserved - charged
    assert sample(m, "quotagate_storage_mode", mode="memory") == 1
    assert sample(m, "quotagate_decision_seconds_count") == 6  # one per inference request
    assert sample(m, "quotagate_in_flight", tier="free") == 0


async def test_concurrency_backend_and_in_flight(tmp_path: Path) -> None:
    upstream = RecordingUpstream(hold=True)
    text = BASE_CONFIG.format(top="", extra="")
    text = text.replace("max_concurrency = 64", "max_concurrency = 1")
    text = text.replace("queue_timeout_ms = 2000", "queue_timeout_ms = 20")
    app = gateway_app(config_from(tmp_path, text), backend=upstream.backend())
    async with in_process(app) as client:
        held = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": ALICE})
        )
        await upstream.entered.wait()
        concurrency = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": ALICE}
        )
        backend = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": BOB}
        )
        during = metric_samples((await client.get("/metrics")).text)
        upstream.release.set()
        await held
        after = metric_samples((await client.get("/metrics")).text)
    assert concurrency.status_code == 429
    assert backend.status_code == 503
    assert sample(during, "quotagate_rejections_total", tier="free", limit="concurrency") == 1
    assert sample(during, "quotagate_rejections_total", tier="pro", limit="backend") == 1
    assert sample(during, "quotagate_in_flight", tier="free") == 1
    assert sample(after, "quotagate_in_flight", tier="free") == 0
    assert (
        sample(after, "quotagate_requests_total", tier="pro", route="completions", status="503")
        == 1
    )


async def test_storage_mode_on_redis(tmp_path: Path, storage: qg.Storage) -> None:
    async with in_process(gateway_app(base_config(tmp_path), storage)) as client:
        m = metric_samples((await client.get("/metrics")).text)
    mode = "redis" if isinstance(storage, qg.RedisStorage) else "memory"
    assert sample(m, "quotagate_storage_mode", mode=mode) == 1
    assert sum(v for (name, _), v in m.items() if name == "quotagate_storage_mode") == 1


async def test_no_label_holds_a_key_or_an_ip(tmp_path: Path) -> None:
    text = BASE_CONFIG.format(top="", extra='[server]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    app = gateway_app(config_from(tmp_path, text))
    secrets = [ALICE, BOB, "sk-wrong-key-123", ANONYMOUS_IP, "10.9.9.9", "198.51.100.23"]
    async with in_process(app, client=("10.9.9.9", 4000)) as client:
        for key in (ALICE, BOB, "sk-wrong-key-123"):
            for path in ("/v1/completions", "/v1/ratelimit", "/health"):
                await client.request(
                    "POST" if path == "/v1/completions" else "GET",
                    path,
                    json={"prompt": "x"} if path == "/v1/completions" else None,
                    headers={"Authorization": f"Bearer {key}"},
                )
        for _ in range(7):  # anonymous, by the forwarded IP, into 429s
            await client.post(
                "/v1/completions",
                json={"prompt": "x"},
                headers={"X-Forwarded-For": "198.51.100.23"},
            )
        exposition = (await client.get("/metrics")).text
    digests = [hashlib.sha256(s.encode()).hexdigest() for s in secrets]
    values = {
        value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        for value in s.labels.values()
    }
    assert values  # there are labels to inspect
    for value in values:
        for secret in secrets:
            assert secret not in value, (secret, value)
        for digest in digests:
            assert digest[:8] not in value, value
    assert not any(part in exposition for part in secrets)

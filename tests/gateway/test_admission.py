"""Admission at the gateway: a model server that says it is full (429/503) has the request sent
elsewhere or queued again and its limit cut, never an error to the client unless the queue
timeout runs out (then 503 backend_overloaded, everything given back); a full queue is 503 at
once; every admitted answer says how long it queued; the adaptive limit in /health and
/metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fleet_fakes import A, B, Replicas, app_of, ask

from helpers import BOB, error_code, in_process, limits_of, metric_samples, sample, until
from quotagate.errors import ConfigError
from quotagate.gateway.config import load_config

CONFIG = """
[[backends]]
name = "big"
kind = "openai"
urls = {urls}
models = ["llama-3-70b"]
max_concurrency = {concurrency}
queue_timeout_ms = {timeout}
max_queued = {queued}
health_interval_s = 0
{adaptive}
[tiers.pro]
requests = "1000/minute"
tokens = "1000000/minute"
priority = 10

[[keys]]
key = "sk-bob-0002"
tier = "pro"
"""

ADAPTIVE = """
[backends.adaptive]
min_concurrency = 4
metrics_url = ""
interval_ms = 60000
"""


def config(
    urls: tuple[str, ...] = (A,),
    *,
    concurrency: int = 8,
    timeout: int = 5000,
    queued: int = 1000,
    adaptive: str = "",
) -> str:
    listed = "[" + ", ".join(f'"{u}"' for u in urls) + "]"
    return CONFIG.format(
        urls=listed, concurrency=concurrency, timeout=timeout, queued=queued, adaptive=adaptive
    )


class FullFor:
    """A status for the replica's first ``times`` completions, then its normal answers."""

    def __init__(self, replicas: Replicas, url: str, status: int, times: int) -> None:
        self.replica = replicas[url]
        self.status = status
        self.left = times
        self.inner = self.replica.handle
        self.replica.handle = self.handle  # type: ignore[method-assign]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions") and self.left > 0:
            self.left -= 1
            self.replica.bodies.append({})
            return httpx.Response(self.status, json={"error": {"message": "queue is full"}})
        return await self.inner(request)


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_full_server_is_asked_again_and_the_client_never_sees_it(
    tmp_path: Path, status: int, stream: bool
) -> None:
    replicas = Replicas(A)
    FullFor(replicas, A, status, times=2)
    app = app_of(tmp_path, replicas, config(adaptive=ADAPTIVE))
    async with in_process(app) as client:
        response = await ask(client, stream=stream)
        health = (await client.get("/health")).json()
    assert response.status_code == 200, response.text
    assert len(replicas[A].bodies) == 3  # twice refused, then served
    # One cut per answer that it is full: 4 (min_concurrency) cannot go lower.
    assert health["backends"]["big"]["concurrency"] == {"a.test:8001": 4}


async def test_a_full_server_sends_the_request_to_another_replica_at_once(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    FullFor(replicas, A, 503, times=1)
    FullFor(replicas, B, 503, times=1)
    app = app_of(tmp_path, replicas, config((A, B)))
    async with in_process(app) as client:
        response = await ask(client)
    assert response.status_code == 200, response.text
    # The first replica tried said full; the other, tried next, said full too; then a slot.
    assert len(replicas[A].bodies) + len(replicas[B].bodies) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_full_until_the_queue_timeout_is_503_backend_overloaded_all_given_back(
    tmp_path: Path, stream: bool
) -> None:
    replicas = Replicas(A)
    FullFor(replicas, A, 503, times=10_000)
    app = app_of(tmp_path, replicas, config(timeout=300))
    async with in_process(app) as client:
        before = await limits_of(client, BOB)
        response = await ask(client, stream=stream, max_tokens=50)
        after = await limits_of(client, BOB)
    assert response.status_code == 503
    assert error_code(response.json()) == "backend_overloaded"
    assert int(response.headers["retry-after"]) >= 1
    assert after["tokens"]["remaining"] == before["tokens"]["remaining"]  # refunded
    assert len(replicas[A].bodies) >= 2  # asked again, backing off, within the 300 ms


async def test_a_full_queue_is_503_backend_overloaded_at_once(tmp_path: Path) -> None:
    replicas = Replicas(A)
    replicas[A].hold = True
    app = app_of(tmp_path, replicas, config(concurrency=1, queued=1))
    async with in_process(app) as client:
        first = asyncio.ensure_future(ask(client))
        await until(lambda: replicas[A].waiting == 1)
        second = asyncio.ensure_future(ask(client))
        await until(lambda: app.state.gateway.fleet.pools["big"].gate.queued == 1)
        third = await ask(client)
        replicas[A].release.set()
        answers = [await first, await second]
    assert third.status_code == 503
    assert error_code(third.json()) == "backend_overloaded"
    assert "queue is full" in third.json()["error"]["message"]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["x-quotagate-queue-ms"] == "0"
    assert int(answers[1].headers["x-quotagate-queue-ms"]) >= 0


async def test_the_adaptive_limit_is_in_health_and_metrics(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas, config((A, B), concurrency=32, adaptive=ADAPTIVE))
    async with in_process(app) as client:
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert health["backends"]["big"]["concurrency"] == {"a.test:8001": 4, "b.test:8002": 4}
    samples = metric_samples(metrics)
    for label in ("a.test:8001", "b.test:8002"):
        limit = sample(samples, "quotagate_backend_concurrency_limit", backend="big", replica=label)
        assert limit == 4


async def test_without_adaptive_the_limit_is_max_concurrency_and_health_is_as_before(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A)
    app = app_of(tmp_path, replicas, config(concurrency=16))
    async with in_process(app) as client:
        health = (await client.get("/health")).json()
        metrics = metric_samples((await client.get("/metrics")).text)
    assert "concurrency" not in health["backends"]["big"]
    labels = {"backend": "big", "replica": "a.test:8001"}
    assert sample(metrics, "quotagate_backend_concurrency_limit", **labels) == 16


def test_bad_adaptive_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config(concurrency=2, adaptive=ADAPTIVE), "utf-8")
    with pytest.raises(ConfigError, match="min_concurrency"):
        load_config(str(path), environ={})
    explicit = ADAPTIVE.replace('metrics_url = ""', 'metrics_url = "http://m:9/metrics"')
    path.write_text(config((A, B), adaptive=explicit), "utf-8")
    with pytest.raises(ConfigError, match="metrics_url"):
        load_config(str(path), environ={})
    path.write_text(config(adaptive=ADAPTIVE.replace('""', '"ftp://x"')), "utf-8")
    with pytest.raises(ConfigError, match="metrics_url"):
        load_config(str(path), environ={})


async def test_a_streams_time_per_token_is_told_16_events_in_and_once(tmp_path: Path) -> None:
    """The controller learns a stream's time per token 16 events into it (the batch it joined,
    not seconds later at its end), and its time to first token at the end: each once."""
    replicas = Replicas(A)
    app = app_of(tmp_path, replicas, config(adaptive=ADAPTIVE))
    controller = app.state.gateway.fleet.pools["big"].replicas[0].controller
    told: list[tuple[float | None, float | None]] = []

    def latency(prompt: int, *, ttft: float | None = None, tpot: float | None = None) -> None:
        told.append((ttft, tpot))

    controller.latency = latency
    async with in_process(app) as client:
        answer = await ask(client, stream=True, max_tokens=40)
        assert answer.status_code == 200
        short = await ask(client, stream=True, max_tokens=3)
        assert short.status_code == 200
    assert len(told) == 3
    (early_ttft, early_tpot), (end_ttft, end_tpot), (short_ttft, short_tpot) = told
    assert early_ttft is None
    assert early_tpot is not None
    assert early_tpot >= 0
    assert end_ttft is not None
    assert end_tpot is None  # not a second time
    assert short_ttft is not None
    assert short_tpot is not None  # too short to tell early

"""The whole-backend cap: at most ``max_concurrency`` requests at the model, the rest queued by
tier priority (FIFO within a tier) for at most ``queue_timeout_ms``, then 503
``backend_overloaded`` with Retry-After."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

import quotagate as qg
from helpers import (
    ALICE,
    BOB,
    CAROL,
    RecordingUpstream,
    base_config,
    config_from,
    error_code,
    gateway_app,
    in_process,
    limits_of,
    mock_answer,
    until,
)
from quotagate.gateway.app import Gateway

CAPPED = """
[backend]
max_concurrency = 1
queue_timeout_ms = {timeout}

[tiers.free]
requests = "100/minute"
tokens = "100000/minute"
concurrency = 8
priority = 1
default_max_tokens = 50

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
concurrency = 8
priority = 10
default_max_tokens = 50

[[keys]]
key = "sk-alice-0001"
tier = "free"

[[keys]]
key = "sk-carol-0003"
tier = "free"

[[keys]]
key = "sk-bob-0002"
tier = "pro"
"""


async def test_the_gate_serves_higher_priority_first_fifo_within_a_priority(
    tmp_path: Path,
) -> None:
    app = gateway_app(config_from(tmp_path, CAPPED.format(timeout=10_000)))
    gateway: Gateway = app.state.gateway
    gate = gateway.fleet.pools["default"].gate
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        assert await gate.acquire(priority, 10.0) is replica
        order.append(name)

    replica = await gate.acquire(1, 0.0)  # the one slot is taken
    assert replica is not None
    tasks = []
    for name, priority in [("free-1", 1), ("free-2", 1), ("free-3", 1), ("pro-1", 10)]:
        tasks.append(asyncio.create_task(wait(name, priority)))
        queued = len(tasks)
        await until(lambda queued=queued: gate.queued == queued)
    for expected in range(1, 5):
        gate.release(replica)
        await until(lambda e=expected: len(order) == e)
    await asyncio.gather(*tasks)
    assert order == ["pro-1", "free-1", "free-2", "free-3"]


async def test_pro_requests_overtake_a_queue_of_free_ones(tmp_path: Path) -> None:
    """Through the app: the model serves one request at a time; while it is busy, three free
    requests queue, then a pro one; the pro request reaches the model next."""
    arrivals: list[str] = []
    go: asyncio.Queue[None] = asyncio.Queue()

    async def model(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        arrivals.append(body["prompt"])
        await go.get()
        return await mock_answer(request.url.path, body)

    upstream = RecordingUpstream(model)
    app = gateway_app(
        config_from(tmp_path, CAPPED.format(timeout=10_000)), backend=upstream.backend()
    )
    gate = app.state.gateway.fleet.pools["default"].gate
    async with in_process(app) as client:

        def send(prompt: str, key: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                client.post("/v1/completions", json={"prompt": prompt}, headers={"X-API-Key": key})
            )

        tasks = [send("busy", ALICE)]
        await until(lambda: arrivals == ["busy"])
        for i, (prompt, key) in enumerate(
            [("free-1", ALICE), ("free-2", CAROL), ("free-3", ALICE), ("pro-1", BOB)], start=1
        ):
            tasks.append(send(prompt, key))
            await until(lambda i=i: gate.queued == i)
        for _ in tasks:
            go.put_nowait(None)
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 5
    assert arrivals == ["busy", "pro-1", "free-1", "free-2", "free-3"]


async def test_backend_full_past_the_queue_timeout_is_503_with_retry_after(
    tmp_path: Path, storage: qg.Storage
) -> None:
    upstream = RecordingUpstream(hold=True)
    config = config_from(tmp_path, CAPPED.format(timeout=150))
    app = gateway_app(config, storage, backend=upstream.backend())
    async with in_process(app) as client:
        busy = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "busy"}, headers={"X-API-Key": ALICE})
        )
        await upstream.entered.wait()
        before = await limits_of(client, BOB)
        started = time.monotonic()
        overloaded = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 10}, headers={"X-API-Key": BOB}
        )
        waited = time.monotonic() - started
        after = await limits_of(client, BOB)
        upstream.release.set()
        first = await busy
    assert first.status_code == 200
    assert overloaded.status_code == 503
    assert overloaded.headers["content-type"] == "application/json"
    assert error_code(overloaded.json()) == "backend_overloaded"
    assert int(overloaded.headers["retry-after"]) >= 1
    assert waited >= 0.15  # it waited for a slot first
    assert after["tokens"] == before["tokens"]  # its reservation was given back
    assert after["concurrency"]["remaining"] == 8  # and its lease


async def test_a_queued_request_served_within_the_timeout_succeeds(tmp_path: Path) -> None:
    upstream = RecordingUpstream(hold=True)
    app = gateway_app(
        config_from(tmp_path, CAPPED.format(timeout=10_000)), backend=upstream.backend()
    )
    gate = app.state.gateway.fleet.pools["default"].gate
    async with in_process(app) as client:
        busy = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "a"}, headers={"X-API-Key": ALICE})
        )
        await upstream.entered.wait()
        queued = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "b"}, headers={"X-API-Key": BOB})
        )
        await until(lambda: gate.queued == 1)
        upstream.release.set()
        responses = await asyncio.gather(busy, queued)
    assert [r.status_code for r in responses] == [200, 200]
    assert gate.in_flight == 0


async def test_rejected_requests_do_not_take_a_backend_slot(tmp_path: Path) -> None:
    """A 429 never reaches the gate: the backend's capacity is for admitted requests."""
    app = gateway_app(base_config(tmp_path))
    gate = app.state.gateway.fleet.pools["default"].gate
    async with in_process(app) as client:
        for _ in range(4):
            await client.post("/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": ALICE})
    assert gate.in_flight == 0
    assert gate.free == gate.max_concurrency

"""Adaptive concurrency end to end: a real ``quotagate serve`` with ``[backends.adaptive]`` in
front of a real ``quotagate mock --gpu`` whose KV cache holds 20 requests. Under three times
that many clients, the gateway reads the mock's vLLM metrics and moves its limit between
``min_concurrency`` and ``max_concurrency``, and every client is served: no error reaches
one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_kit import KEY, TIERS, FleetGateway, _clean_env

from quotagate.testing import QuotagateProcess, http_status

MAX = 64


class GpuMock(QuotagateProcess):
    """``quotagate mock --gpu``: 2000 KV tokens, so 20 requests of 10 + 90 tokens at a time."""

    def __init__(self) -> None:
        args = ["mock", "--gpu", "--port", "{port}", "--kv-tokens", "2000"]
        args += ["--tokens-per-second", "20000", "--step-ms", "2"]
        super().__init__(*args, name="gpu-mock", env=_clean_env(), port_retries=3)

    def ready(self) -> bool:
        return http_status(self.port, "/metrics") == 200


@pytest.fixture
def gpu() -> Iterator[GpuMock]:
    mock = GpuMock()
    mock.start()
    try:
        yield mock
    finally:
        mock.close()


def config(url: str) -> str:
    return (
        TIERS
        + f"""
[[backends]]
name = "gpu"
kind = "openai"
urls = ["{url}/v1"]
models = ["quotagate-mock"]
max_concurrency = {MAX}
queue_timeout_ms = 60000
health_interval_s = 0

[backends.adaptive]
min_concurrency = 2
interval_ms = 100
"""
    )


async def test_the_limit_follows_the_model_servers_kv_cache(tmp_path: Path, gpu: GpuMock) -> None:
    gateway = FleetGateway(config(gpu.url), tmp_path)
    gateway.start()
    try:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(timeout=60, trust_env=False, limits=limits) as client:
            body = {"model": "quotagate-mock", "prompt": "a b c d e f g h i j", "max_tokens": 90}
            headers = {"X-API-Key": KEY}
            seen: list[int] = []

            async def one_client() -> list[int]:
                statuses = []
                for _ in range(6):
                    answer = await client.post(
                        f"{gateway.url}/v1/completions", json=body, headers=headers
                    )
                    statuses.append(answer.status_code)
                    assert "x-quotagate-queue-ms" in answer.headers
                return statuses

            async def watch() -> None:
                while True:
                    health = (await client.get(f"{gateway.url}/health")).json()
                    seen.extend(health["backends"]["gpu"]["concurrency"].values())
                    await asyncio.sleep(0.05)

            watcher = asyncio.ensure_future(watch())
            try:
                results = await asyncio.gather(*(one_client() for _ in range(60)))
            finally:
                watcher.cancel()
            health = (await client.get(f"{gateway.url}/health")).json()
        assert all(status == 200 for statuses in results for status in statuses)
        assert max(seen) > 2  # it rose from min_concurrency
        final = health["backends"]["gpu"]["concurrency"][f"127.0.0.1:{gpu.port}"]
        # Where it settles depends on how fast this machine runs the mock; the cut itself is
        # asserted with an injected clock in tests/unit/test_adaptive.py.
        assert 2 <= final <= MAX
    finally:
        gateway.close()

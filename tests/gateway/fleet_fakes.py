"""A fleet in process for the gateway tests: the fleet config text, fake model servers behind
``httpx.MockTransport`` (they answer as the mock model, record what they received, and can be
held, refuse connections or fail after being reached), and the gateway built on them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

import quotagate as qg
from helpers import BOB, config_from, mock_answer
from quotagate.gateway.app import create_app
from quotagate.gateway.backends import Backend, backend_from_config
from quotagate.gateway.backends.openai import OpenAIBackend
from quotagate.gateway.config import FleetBackendConfig

A, B, C = "http://a.test:8001/v1", "http://b.test:8002/v1", "http://c.test:8003/v1"

FLEET = """
[[backends]]
name = "big"
kind = "openai"
urls = {urls}
models = ["llama-3-70b"]
max_concurrency = {concurrency}
queue_timeout_ms = 5000
health_interval_s = 3600

[backends.aliases]
"gpt-4o-mini" = "llama-3-70b"

[[backends]]
name = "small"
kind = "mock"
models = ["quotagate-mock"]
{more}
[tiers.free]
requests = "100/minute"
tokens = "100000/minute"
priority = 1

[tiers.free.models."gpt-4o-mini"]
requests = "2/minute"

[tiers.pro]
requests = "100/minute"
tokens = "1000000/minute"
priority = 10

[[keys]]
key = "sk-alice-0001"
tier = "free"

[[keys]]
key = "sk-bob-0002"
tier = "pro"
"""


def fleet_text(urls: list[str] | None = None, concurrency: int = 8, more: str = "") -> str:
    return FLEET.format(urls=json.dumps(urls or [A, B]), concurrency=concurrency, more=more)


class FakeReplica:
    """One model server: the mock's answers, what it received, and the failures it is told."""

    def __init__(self, models: tuple[str, ...] = ("llama-3-70b",)) -> None:
        self.models = models
        self.bodies: list[dict[str, Any]] = []
        self.probes = 0
        self.refuse = False  # connections refused: the request never reaches it
        self.status: int | None = None  # reached, then answers this
        self.hold = False
        self.release = asyncio.Event()
        self.waiting = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.refuse:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/models"):
            self.probes += 1
            data = [{"id": m, "object": "model", "owned_by": "upstream"} for m in self.models]
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.status is not None:
            return httpx.Response(self.status, json={"error": {"message": "boom"}})
        if self.hold:
            self.waiting += 1
            await self.release.wait()
            self.waiting -= 1
        return await mock_answer(request.url.path, body)


class Replicas(dict[str, FakeReplica]):
    """The fake model servers by URL, and the gateway's factory of clients to them."""

    def __init__(self, *urls: str) -> None:
        super().__init__((url, FakeReplica()) for url in urls)

    def client(self, spec: FleetBackendConfig, url: str | None) -> Backend:
        if url is None:  # the in-process mock
            return backend_from_config(spec, url)
        return OpenAIBackend(url, transport=httpx.MockTransport(self[url].handle))


def app_of(tmp_path: Path, replicas: Replicas, text: str | None = None) -> Any:
    """The gateway on ``text`` written to ``tmp_path/gateway.toml`` (which a reload reads)."""
    config = config_from(tmp_path, text or fleet_text())
    return create_app(
        config,
        storage=qg.MemoryStorage(clock=qg.FakeClock()),
        backends=replicas.client,
        config_path=str(tmp_path / "gateway.toml"),
    )


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def ask(
    client: httpx.AsyncClient, model: str = "llama-3-70b", key: str = BOB, **extra: Any
) -> httpx.Response:
    """A chat completion for ``model`` with ``key``."""
    return await client.post(
        "/v1/chat/completions", json=chat(model, **extra), headers={"X-API-Key": key}
    )

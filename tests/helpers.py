"""Helpers of the gateway tests (and of the reliability tests, which drive the same gateway):
configs from TOML text, the app in process with its lifespan, ``quotagate`` CLI runs, upstreams
made of httpx.MockTransport, and Prometheus text parsed. Processes, ports and polling are
``quotagate.testing``'s (through ``support``)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

import quotagate as qg
from quotagate.gateway.app import create_app
from quotagate.gateway.backends import Route
from quotagate.gateway.backends.mock import NATURAL_LENGTH, MockBackend, mock_text
from quotagate.gateway.backends.openai import OpenAIBackend
from quotagate.gateway.config import GatewayConfig, load_config
from quotagate.gateway.schemas import validate_body
from quotagate.gateway.tokens import prompt_tokens

__all__ = [
    "ALICE",
    "BAD_CONFIG",
    "BASE_CONFIG",
    "BOB",
    "CAROL",
    "NATURAL_LENGTH",
    "RecordingUpstream",
    "base_config",
    "chat_prompt",
    "completion_prompt",
    "config_from",
    "error_code",
    "error_of",
    "gateway_app",
    "in_process",
    "limits_of",
    "metric_samples",
    "mock_answer",
    "mock_text",
    "run_cli",
    "sample",
    "sse_events",
    "stream_then_disconnect",
    "until",
]

UPSTREAM_URL = "http://upstream.test/v1"

ALICE = "sk-alice-0001"  # free tier, a plain key in the config
BOB = "sk-bob-0002"  # pro tier, configured by its SHA-256 only
CAROL = "sk-carol-0003"  # free tier

#: A config with four errors, each reported on its own line: storage.url, tiers.free.requests,
#: tiers.free.concurrency, keys[1].tier.
BAD_CONFIG = """
[storage]
url = "memcached://x"

[tiers.free]
requests = "sixty per minute"
concurrency = -1

[[keys]]
key = "sk-a"
tier = "free"

[[keys]]
key = "sk-b"
tier = "platinum"
"""

#: Three tiers and three keys; ``{top}`` takes top-level settings, ``{extra}`` more tables.
BASE_CONFIG = """
{top}

[backend]
max_concurrency = 64
queue_timeout_ms = 2000

[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "5/minute"
tokens = "1000/minute"
concurrency = 1
default_max_tokens = 100

[tiers.free]
requests = "3/minute"
tokens = "600/minute"
concurrency = 1
priority = 1
default_max_tokens = 50

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
concurrency = 4
priority = 10
default_max_tokens = 200

[[keys]]
key = "sk-alice-0001"
tier = "free"
name = "alice"

[[keys]]
sha256 = "7ff7f49c6da0ee76ea0001ee9d3ad853f002a7e30083acf604160687f609f0aa"
tier = "pro"
name = "bob"

[[keys]]
key = "sk-carol-0003"
tier = "free"

{extra}
"""


def base_config(tmp_path: Path, *, top: str = "", extra: str = "") -> GatewayConfig:
    return config_from(tmp_path, BASE_CONFIG.format(top=top, extra=extra))


def config_from(tmp_path: Path, text: str, name: str = "gateway.toml") -> GatewayConfig:
    """Write ``text`` as a TOML file and load it as the gateway would (no QUOTAGATE_* env)."""
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return load_config(path, environ={})


def gateway_app(
    config: GatewayConfig,
    storage: qg.Storage | None = None,
    *,
    clock: qg.FakeClock | None = None,
    backend: Any = None,
    backends: Any = None,
) -> FastAPI:
    """The gateway app on ``storage`` (memory on ``clock`` by default)."""
    if storage is None:
        storage = qg.MemoryStorage(clock=clock or qg.FakeClock())
    return create_app(config, storage=storage, backend=backend, backends=backends)


@asynccontextmanager
async def in_process(
    app: FastAPI,
    client: tuple[str, int] = ("127.0.0.1", 50000),
    *,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``app`` in process, with the app's lifespan running.

    ``raise_app_exceptions=False`` answers an unhandled exception as the server would: a 500.
    """
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(
            app=app, client=client, raise_app_exceptions=raise_app_exceptions
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
            yield c


async def limits_of(client: httpx.AsyncClient, key: str | None = None) -> dict[str, Any]:
    """``GET /v1/ratelimit`` as ``{"tier": ..., "requests": {...}, "tokens": {...}, ...}``.

    Each limit name maps to its first entry (``limit``, ``remaining``, ``reset_after``).
    """
    headers = {"X-API-Key": key} if key else {}
    response = await client.get("/v1/ratelimit", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    out: dict[str, Any] = {"tier": body["tier"]}
    for entry in body["limits"]:
        out.setdefault(entry["name"], entry)
    return out


def completion_prompt(prompt: str) -> int:
    """The gateway's (and the mock's) token estimate of a completions prompt."""
    return prompt_tokens("completions", {"prompt": prompt})


def chat_prompt(messages: list[dict[str, Any]]) -> int:
    return prompt_tokens("chat", {"messages": messages})


class RecordingUpstream:
    """An OpenAI-compatible upstream behind ``httpx.MockTransport``: records every request body,
    answers like the mock model (exact usage), and can be held until released or made to fail.

    ``handler`` (optional) overrides the answer: ``(request, body) -> httpx.Response``.
    """

    def __init__(
        self,
        handler: Callable[[httpx.Request, dict[str, Any]], Awaitable[httpx.Response]] | None = None,
        *,
        hold: bool = False,
    ) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.handler = handler
        self.hold = hold
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.waiting = 0

    def backend(self) -> OpenAIBackend:
        return OpenAIBackend(UPSTREAM_URL, transport=httpx.MockTransport(self._handle))

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.bodies.append(body)
        self.paths.append(request.url.path)
        if self.hold:
            self.waiting += 1
            self.entered.set()
            await self.release.wait()
            self.waiting -= 1
        if self.handler is not None:
            return await self.handler(request, body)
        return await mock_answer(request.url.path, body)


async def mock_answer(path: str, body: dict[str, Any]) -> httpx.Response:
    """What the mock model answers (``MockBackend``: exact usage, SSE when asked), as a response
    whose body arrives as a stream, the way a real network response does."""
    if path.endswith("/models"):
        payload = {"object": "list", "data": await MockBackend().models()}
        return httpx.Response(200, json=payload)
    route: Route = "chat" if path.endswith("/chat/completions") else "completions"
    body = copy.deepcopy(body)  # the recorded body stays as it came
    assert validate_body(route, body) is None  # as ``quotagate mock`` does (37.0 -> 37)
    if body.get("stream"):
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=MockBackend().stream(route, body),
        )
    answer = (await MockBackend().complete(route, body)).raw

    async def content() -> AsyncIterator[bytes]:
        yield answer

    return httpx.Response(200, headers={"content-type": "application/json"}, content=content())


async def stream_then_disconnect(
    app: FastAPI, path: str, body: dict[str, Any], key: str, events: int
) -> list[bytes]:
    """Drive the ASGI app as a server would: the client reads ``events`` SSE events, then goes
    away (``http.disconnect``)."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"gateway.test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"x-api-key", key.encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("gateway.test", 80),
    }
    received: list[bytes] = []
    gone = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if b"".join(received).count(b"\n\n") >= events:
                gone.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return received


def error_of(body: Any) -> dict[str, Any]:
    """The error object of a gateway error body, checked to be OpenAI's shape:
    ``{"error": {"message", "type", "code", "param", ...}}``."""
    assert isinstance(body, dict), body
    assert list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict), body
    assert {"message", "type", "code", "param"} <= set(error), body
    assert isinstance(error["message"], str), body
    assert isinstance(error["code"], str), body
    return error


def error_code(body: Any) -> str | None:
    """The ``code`` of a gateway error body (OpenAI's shape), None for a body that is no error."""
    if not (isinstance(body, dict) and "error" in body):
        return None
    return str(error_of(body)["code"])


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        line[len("data:") :].strip()
        for block in text.replace("\r\n", "\n").split("\n\n")
        for line in block.split("\n")
        if line.startswith("data:")
    ]


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m quotagate ARGS`` to completion (``input`` on its stdin)."""
    return subprocess.run(
        [sys.executable, "-m", "quotagate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        input=input,
        check=False,
    )


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text as ``{(sample name, labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value; 0 when absent (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until ``condition()`` holds (no wall-clock waiting)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")

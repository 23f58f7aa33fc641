"""The ``openai`` backend: a real upstream process (the mock model served standalone by
``quotagate mock``), and upstreams that are down, time out or fail (httpx.MockTransport):
502/504 JSON naming the problem, reserved tokens refunded, lease released."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import quotagate as qg
from helpers import (
    ALICE,
    BOB,
    NATURAL_LENGTH,
    RecordingUpstream,
    base_config,
    chat_prompt,
    completion_prompt,
    error_code,
    error_of,
    gateway_app,
    in_process,
    limits_of,
    mock_text,
    sse_events,
)
from quotagate.gateway.backends.openai import OpenAIBackend
from support import QuotagateProcess, free_port

PRO_TOKENS = 100_000
FREE_TOKENS = 600


async def test_completion_through_a_real_upstream_settles_exactly(
    tmp_path: Path, storage: qg.Storage, upstream: QuotagateProcess
) -> None:
    backend = OpenAIBackend(f"{upstream.url}/v1")
    app = gateway_app(base_config(tmp_path), storage, backend=backend)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions",
            json={"model": "quotagate-mock", "prompt": "Say hi", "max_tokens": 64},
            headers={"X-API-Key": BOB},
        )
        state = await limits_of(client, BOB)
        models = await client.get("/v1/models", headers={"X-API-Key": BOB})
    assert response.status_code == 200, response.text
    prompt = completion_prompt("Say hi")
    assert response.headers["x-ratelimit-remaining-tokens"] == str(PRO_TOKENS - (prompt + 64))
    usage = response.json()["usage"]
    assert usage == {
        "prompt_tokens": prompt,
        "completion_tokens": NATURAL_LENGTH,
        "total_tokens": prompt + NATURAL_LENGTH,
    }
    assert state["tokens"]["remaining"] == PRO_TOKENS - usage["total_tokens"]
    assert "quotagate-mock" in [m["id"] for m in models.json()["data"]]


async def test_stream_through_a_real_upstream_settles_exactly(
    tmp_path: Path, storage: qg.Storage, upstream: QuotagateProcess
) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    backend = OpenAIBackend(f"{upstream.url}/v1")
    app = gateway_app(base_config(tmp_path), storage, backend=backend)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": messages, "stream": True, "max_tokens": 12},
            headers={"X-API-Key": BOB},
        )
        state = await limits_of(client, BOB)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(mock_text(12))
    assert all(not c.get("usage") for c in chunks)  # not asked by the client
    assert state["tokens"]["remaining"] == PRO_TOKENS - (chat_prompt(messages) + 12)


async def _after_failure(
    tmp_path: Path, storage: qg.Storage, backend: OpenAIBackend, *, stream: bool
) -> tuple[httpx.Response, dict[str, Any]]:
    app = gateway_app(base_config(tmp_path), storage, backend=backend)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions",
            json={"prompt": "Say hi", "max_tokens": 100, "stream": stream},
            headers={"X-API-Key": ALICE},
        )
        state = await limits_of(client, ALICE)
    return response, state


def _assert_refunded_and_released(state: dict[str, Any]) -> None:
    assert state["tokens"]["remaining"] == FREE_TOKENS  # the reservation was given back
    assert state["concurrency"]["remaining"] == 1  # and the slot


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_down_is_502_refunded_released(
    tmp_path: Path, storage: qg.Storage, stream: bool
) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", connect_timeout=2)
    response, state = await _after_failure(tmp_path, storage, backend, stream=stream)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert error_code(body) == "upstream_unavailable"
    assert error_of(body)["message"]
    _assert_refunded_and_released(state)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_timing_out_is_504_refunded_released(
    tmp_path: Path, storage: qg.Storage, stream: bool
) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    backend = OpenAIBackend("http://upstream.test/v1", transport=httpx.MockTransport(timeout))
    response, state = await _after_failure(tmp_path, storage, backend, stream=stream)
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/json"
    assert error_code(response.json()) == "upstream_timeout"
    _assert_refunded_and_released(state)


async def test_a_really_slow_upstream_times_out_as_504(
    tmp_path: Path, storage: qg.Storage, slow_upstream: QuotagateProcess
) -> None:
    backend = OpenAIBackend(f"{slow_upstream.url}/v1", timeout=0.3)
    response, state = await _after_failure(tmp_path, storage, backend, stream=False)
    assert response.status_code == 504
    assert error_code(response.json()) == "upstream_timeout"
    _assert_refunded_and_released(state)


@pytest.mark.parametrize("status", [500, 502, 504])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_5xx_is_502_refunded_released(
    tmp_path: Path, storage: qg.Storage, status: int, stream: bool
) -> None:
    async def failing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "CUDA out of memory"}})

    backend = RecordingUpstream(failing).backend()
    response, state = await _after_failure(tmp_path, storage, backend, stream=stream)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert error_code(body) == "upstream_error"
    assert str(status) in error_of(body)["message"]
    _assert_refunded_and_released(state)


@pytest.mark.parametrize(
    "content", [b"<html>oops</html>", b"[1, 2, 3]", b""], ids=["html", "list", "empty"]
)
async def test_upstream_garbage_is_502_not_500(
    tmp_path: Path, storage: qg.Storage, content: bytes
) -> None:
    async def garbage(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, content=content)

    backend = RecordingUpstream(garbage).backend()
    response, state = await _after_failure(tmp_path, storage, backend, stream=False)
    assert response.status_code == 502
    assert error_code(response.json()) == "upstream_error"
    _assert_refunded_and_released(state)


async def test_models_with_the_upstream_down_is_502_json(tmp_path: Path) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", connect_timeout=2)
    async with in_process(gateway_app(base_config(tmp_path), backend=backend)) as client:
        response = await client.get("/v1/models")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert error_code(response.json())


async def test_the_upstream_key_from_the_environment_is_sent_as_bearer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QG_TEST_UPSTREAM_KEY", "sk-upstream-secret")
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(
            200,
            json={"choices": [{"index": 0, "text": " a"}], "usage": {"total_tokens": 3}},
        )

    backend = OpenAIBackend.from_env(
        "http://upstream.test/v1", "QG_TEST_UPSTREAM_KEY", transport=httpx.MockTransport(handler)
    )
    async with in_process(gateway_app(base_config(tmp_path), backend=backend)) as client:
        response = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": ALICE}
        )
    assert response.status_code == 200
    assert seen == ["Bearer sk-upstream-secret"]  # not the client's key

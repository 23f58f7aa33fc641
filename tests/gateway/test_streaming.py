"""Streamed completions (SSE exactly as OpenAI frames them), and their token reconciliation:
from the final usage chunk, from counting the streamed text, and for a client that goes away
mid-stream. In process, on memory and real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import quotagate as qg
from helpers import (
    BOB,
    NATURAL_LENGTH,
    RecordingUpstream,
    base_config,
    chat_prompt,
    completion_prompt,
    in_process,
    limits_of,
    metric_samples,
    mock_text,
    sample,
    sse_events,
    stream_then_disconnect,
)
from quotagate.gateway.app import create_app
from quotagate.gateway.backends.mock import MockBackend
from quotagate.testing import async_wait_until

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
PRO_TOKENS = 100_000


async def test_chat_stream_is_openai_sse_ending_in_done(
    tmp_path: Path, storage: qg.Storage
) -> None:
    app = create_app(base_config(tmp_path), storage=storage)
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "quotagate-mock", "messages": MESSAGES, "stream": True},
            headers={"X-API-Key": BOB},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "".join(mock_text(NATURAL_LENGTH))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The client did not ask for usage: OpenAI sends no usage chunk then.
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize(
    ("route", "body", "prompt", "cap", "n"),
    [
        ("chat", {"messages": MESSAGES, "max_tokens": 40}, chat_prompt(MESSAGES), 40, 1),
        ("chat", {"messages": MESSAGES}, chat_prompt(MESSAGES), 200, 1),
        (
            "completions",
            {"prompt": "Once upon", "max_tokens": 10},
            completion_prompt("Once upon"),
            10,
            1,
        ),
        (
            "completions",
            {"prompt": "Once upon", "max_tokens": 30, "n": 2},
            completion_prompt("Once upon"),
            30,
            2,
        ),
    ],
)
async def test_stream_reserves_then_settles_exactly(
    tmp_path: Path,
    storage: qg.Storage,
    include_usage: bool,
    route: str,
    body: dict[str, Any],
    prompt: int,
    cap: int,
    n: int,
) -> None:
    app = create_app(base_config(tmp_path), storage=storage)
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    request = {**body, "stream": True}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    async with in_process(app) as client:
        response = await client.post(path, json=request, headers={"X-API-Key": BOB})
        state = await limits_of(client, BOB)
    assert response.status_code == 200
    reserved = (prompt + cap) * n
    # Headers precede the body: values as of the admission decision.
    assert response.headers["x-ratelimit-remaining-tokens"] == str(PRO_TOKENS - reserved)
    total = prompt + min(cap, NATURAL_LENGTH) * n
    assert state["tokens"]["remaining"] == PRO_TOKENS - total
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1
        assert usage_chunks[0] is chunks[-1]
        assert usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["total_tokens"] == total
    else:
        assert usage_chunks == []


def _sse(payloads: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    """An upstream's SSE body, streamed event by event (as a real upstream sends it)."""

    async def events() -> AsyncIterator[bytes]:
        for payload in payloads:
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return events()


async def test_the_gateway_asks_the_upstream_for_usage_and_uses_it(
    tmp_path: Path, storage: qg.Storage
) -> None:
    async def answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        words = [{"object": "text_completion", "choices": [{"index": 0, "text": " w"}]}] * 3
        usage = {
            "object": "text_completion",
            "choices": [],
            "usage": {"prompt_tokens": 50, "completion_tokens": 50, "total_tokens": 100},
        }
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse([*words, usage])
        )

    upstream = RecordingUpstream(answer)
    app = create_app(base_config(tmp_path), storage=storage, backend=upstream.backend())
    async with in_process(app) as client:
        response = await client.post(
            "/v1/completions",
            json={"prompt": "hi", "max_tokens": 300, "stream": True},
            headers={"X-API-Key": BOB},
        )
        state = await limits_of(client, BOB)
    assert response.status_code == 200
    assert upstream.bodies[0]["stream_options"]["include_usage"] is True
    assert state["tokens"]["remaining"] == PRO_TOKENS - 100  # the usage chunk's total
    assert "usage" not in response.text  # the client did not ask for it


async def test_a_stream_without_usage_is_charged_by_counting_its_text(
    tmp_path: Path, storage: qg.Storage
) -> None:
    words = mock_text(10)

    async def answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        chunks = [
            {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            },
            *(
                {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": w}}],
                }
                for w in words
            ),
            {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            },
        ]
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse(chunks)
        )

    upstream = RecordingUpstream(answer)
    app = create_app(base_config(tmp_path), storage=storage, backend=upstream.backend())
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 500, "stream": True},
            headers={"X-API-Key": BOB},
        )
        state = await limits_of(client, BOB)
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    assert state["tokens"]["remaining"] == PRO_TOKENS - (chat_prompt(MESSAGES) + 10)


@pytest.mark.parametrize("route", ["completions", "chat"])
async def test_a_client_that_disconnects_mid_stream_pays_for_what_was_generated(
    tmp_path: Path, storage: qg.Storage, route: str
) -> None:
    config = base_config(tmp_path)
    app = create_app(config, storage=storage, backend=MockBackend(tokens_per_second=50))
    gateway = app.state.gateway
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": MESSAGES}
        prompt = chat_prompt(MESSAGES)
    else:
        path, body = "/v1/completions", {"prompt": "Once upon"}
        prompt = completion_prompt("Once upon")
    body = {**body, "max_tokens": 100, "stream": True}
    async with in_process(app) as client:
        received = await stream_then_disconnect(app, path, body, BOB, events=4)

        async def slot_is_back() -> bool:
            return (await limits_of(client, BOB))["concurrency"]["remaining"] == 4

        await async_wait_until(slot_is_back, 10, "the slot is back")
        state = await limits_of(client, BOB)
        metrics = metric_samples((await client.get("/metrics")).text)
    text = b"".join(received)
    assert b"[DONE]" not in text  # it really left mid-stream
    charged = PRO_TOKENS - state["tokens"]["remaining"]
    # Four events read: three words for chat (the first carries the role), four otherwise.
    seen = 3 if route == "chat" else 4
    assert prompt + seen <= charged < prompt + NATURAL_LENGTH
    assert charged < prompt + 100  # far below the reservation
    assert state["requests"]["remaining"] == 99
    assert gateway.fleet.pools["default"].gate.in_flight == 0
    assert sample(metrics, "quotagate_in_flight", tier="pro") == 0


async def test_a_client_gone_mid_stream_closes_the_upstream_stream(
    tmp_path: Path, storage: qg.Storage
) -> None:
    """The model server stops generating for a client that left: the gateway closes its
    upstream stream, charges what was relayed, and frees the slot."""
    closed = asyncio.Event()
    produced: list[int] = []

    async def answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            try:
                for i in range(500):
                    await asyncio.sleep(0.005)  # a model generating
                    produced.append(i)
                    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": " w"}]}
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                closed.set()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    upstream = RecordingUpstream(answer)
    app = create_app(base_config(tmp_path), storage=storage, backend=upstream.backend())
    async with in_process(app) as client:
        await stream_then_disconnect(
            app, "/v1/completions", {"prompt": "x", "max_tokens": 900, "stream": True}, BOB, 3
        )
        await asyncio.wait_for(closed.wait(), timeout=10)
        generated = len(produced)

        async def settled() -> bool:
            state = await limits_of(client, BOB)
            return state["concurrency"]["remaining"] == 4

        await async_wait_until(settled, 10, "the stream settled")
        state = await limits_of(client, BOB)
    assert generated < 500
    charged = PRO_TOKENS - state["tokens"]["remaining"]
    assert 1 + 3 <= charged <= 1 + generated

"""End to end over real sockets: the official ``openai`` SDK -> ``quotagate serve`` (a real
process, on memory and on real Redis) -> the mock model served standalone by a second process
(``gateway``), or the gateway's own mock model generating slowly (``slow_gateway``).
Token reconciliation with exact numbers; a 429 raises ``openai.RateLimitError`` with our headers;
a client that goes away mid-stream pays for what was generated and gets its slot back."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import (
    NATURAL_LENGTH,
    chat_prompt,
    completion_prompt,
    error_code,
    mock_text,
)
from quotagate.testing import wait_until
from support import QuotagateProcess, RedisServer

# "N/day": one token comes back every 86.4 s, so numbers stay exact for the whole test.
TIER = """
[tiers.paced]
requests = "3/day"
tokens = "1000/day"
concurrency = 2
default_max_tokens = 100
"""
CAPACITY = 1000
KEYS = [f"sk-sdk-{i:04d}" for i in range(8)]


@dataclass
class Gateway:
    url: str
    storage: str

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def limits(self, key: str) -> dict[str, Any]:
        body = httpx.get(
            f"{self.url}/v1/ratelimit", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()
        return {entry["name"]: entry for entry in body["limits"]} | {"tier": body["tier"]}


def _serve(request: pytest.FixtureRequest, tmp: Path, backend: str) -> Iterator[Gateway]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
    else:
        url = "memory://"
    keys = "".join(f'[[keys]]\nkey = "{key}"\ntier = "paced"\n\n' for key in KEYS)
    path = tmp / "gateway.toml"
    path.write_text(
        f'[storage]\nurl = "{url}"\nprefix = "t{uuid.uuid4().hex[:10]}"\n\n'
        f"{backend}\n{TIER}\n{keys}",
        "utf-8",
    )
    with QuotagateProcess("serve", "--config", str(path), "--port", "{port}") as process:
        yield Gateway(process.url, request.param)


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: QuotagateProcess,
) -> Iterator[Gateway]:
    """The gateway in front of the real upstream process."""
    backend = f'[backend]\nkind = "openai"\nurl = "{upstream.url}/v1"\n'
    yield from _serve(request, tmp_path_factory.mktemp("sdk"), backend)


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def slow_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The gateway's own mock model, generating 10 tokens a second."""
    backend = '[backend]\nkind = "mock"\nmock_tokens_per_second = 10\n'
    yield from _serve(request, tmp_path_factory.mktemp("slow"), backend)


def test_completion(gateway: Gateway) -> None:
    key = KEYS[0]
    with gateway.client(key) as client:
        raw = client.completions.with_raw_response.create(
            model="quotagate-mock", prompt="Say hi", max_tokens=50
        )
        completion = raw.parse()
    prompt = completion_prompt("Say hi")
    assert completion.choices[0].text == "".join(mock_text(NATURAL_LENGTH))
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.total_tokens) == (
        prompt,
        prompt + NATURAL_LENGTH,
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    assert raw.headers["x-ratelimit-limit-tokens"] == str(CAPACITY)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(CAPACITY - (prompt + 50))
    assert gateway.limits(key)["tokens"]["remaining"] == CAPACITY - (prompt + NATURAL_LENGTH)


def test_chat_completion_with_the_default_output_cap(gateway: Gateway) -> None:
    key = KEYS[1]
    messages = [{"role": "user", "content": "Hello!"}]
    with gateway.client(key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="quotagate-mock", messages=messages
        )
        chat = raw.parse()
    prompt = chat_prompt(messages)
    assert chat.choices[0].message.content == "".join(mock_text(NATURAL_LENGTH))
    assert chat.usage is not None
    assert chat.usage.total_tokens == prompt + NATURAL_LENGTH
    # default_max_tokens (100) was reserved, then settled on the real usage.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(CAPACITY - (prompt + 100))
    assert gateway.limits(key)["tokens"]["remaining"] == CAPACITY - chat.usage.total_tokens


def test_chat_stream_with_usage(gateway: Gateway) -> None:
    key = KEYS[2]
    messages = [{"role": "user", "content": "Stream me a story"}]
    with gateway.client(key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="quotagate-mock",
            messages=messages,
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
    prompt = chat_prompt(messages)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(CAPACITY - (prompt + 60))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(mock_text(NATURAL_LENGTH))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == prompt + NATURAL_LENGTH
    assert gateway.limits(key)["tokens"]["remaining"] == CAPACITY - (prompt + NATURAL_LENGTH)


def test_completion_stream_without_usage(gateway: Gateway) -> None:
    key = KEYS[3]
    with gateway.client(key) as client:
        stream = client.completions.create(
            model="quotagate-mock", prompt="Once upon a time", max_tokens=7, stream=True
        )
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(mock_text(7))
    assert all(c.usage is None for c in chunks)
    prompt = completion_prompt("Once upon a time")
    assert gateway.limits(key)["tokens"]["remaining"] == CAPACITY - (prompt + 7)


def test_the_raw_stream_ends_in_done(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {KEYS[4]}"},
        timeout=10,
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.endswith("data: [DONE]\n\n")


def test_a_429_raises_rate_limit_error_with_our_headers(slow_gateway: Gateway) -> None:
    with slow_gateway.client(KEYS[5]) as client:
        for _ in range(3):
            client.completions.create(model="quotagate-mock", prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="quotagate-mock", prompt="x", max_tokens=1)
    exc = info.value
    assert exc.status_code == 429
    headers = exc.response.headers
    seconds = int(headers["retry-after"])
    assert 28_000 <= seconds <= 28_800  # 3/day: one request every 8 hours
    assert int(headers["retry-after-ms"]) // 1000 in (seconds - 1, seconds)
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+h\d+m\d+s", headers["x-ratelimit-reset-requests"])
    assert headers["ratelimit-policy"]
    message = f"Too many requests. Try again in {seconds} seconds."
    assert exc.response.json() == {
        "error": {
            "message": message,
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
            "retry_after": seconds,
            "limit": "requests",
        }
    }
    # What the SDK makes of it: our message and code, not just "Error code: 429".
    assert exc.code == "rate_limit_exceeded"
    assert exc.type == "requests"
    assert message in str(exc)
    assert exc.body == exc.response.json()["error"]


def test_unknown_key_raises_authentication_error(gateway: Gateway) -> None:
    with (
        gateway.client("sk-nobody-0000") as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.completions.create(model="quotagate-mock", prompt="x")
    assert error_code(info.value.response.json()) == "invalid_api_key"
    assert info.value.code == "invalid_api_key"
    assert "API key" in str(info.value)


def test_a_bad_field_raises_bad_request_naming_it(gateway: Gateway) -> None:
    with gateway.client(KEYS[7]) as client, pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="quotagate-mock", prompt="x", max_tokens=-1)
    assert (info.value.code, info.value.param) == ("invalid_request", "max_tokens")
    assert "max_tokens" in str(info.value)


def test_a_client_gone_mid_stream_pays_for_what_was_generated(slow_gateway: Gateway) -> None:
    key = KEYS[6]
    prompt = completion_prompt("Once upon a time")
    with slow_gateway.client(key) as client:
        stream = client.completions.create(
            model="quotagate-mock", prompt="Once upon a time", max_tokens=200, stream=True
        )
        words = []
        for chunk in stream:
            words.append(chunk.choices[0].text)
            if len(words) == 3:
                break
        during = slow_gateway.limits(key)
        stream.close()  # the client goes away
    wait_until(
        lambda: slow_gateway.limits(key)["concurrency"]["remaining"] == 2, 10, "the lease released"
    )
    state = slow_gateway.limits(key)
    assert words == mock_text(3)
    assert during["concurrency"]["remaining"] == 1
    assert during["tokens"]["remaining"] == CAPACITY - (prompt + 200)
    charged = CAPACITY - state["tokens"]["remaining"]
    assert prompt + 3 <= charged < prompt + NATURAL_LENGTH  # what was generated, not the cap

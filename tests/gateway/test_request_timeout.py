"""``server.request_timeout_s``: a client has that long to send a whole request, head and body,
once the connection waits for one. A stalled or trickling client gets a 408 and loses the
connection (it would hold it, and a file descriptor, for ever); a slow *answer* is never cut.

Through a real ``quotagate serve`` process and raw sockets: the stalls are the client's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import error_code, metric_samples, sample
from support import QuotagateProcess

TIMEOUT_S = 1.0
TOKENS_PER_SECOND = 10  # a 20-token answer takes 2 s: twice the request timeout
KEY = "sk-timeout-0001"
#: Used by nothing but the "nothing is charged" test, at day-long rates: a charge would show for
#: hours (at the open tier's rates it comes back within a millisecond, unseen).
UNTOUCHED = "sk-timeout-0002"

CONFIG = f"""
[server]
request_timeout_s = {TIMEOUT_S}

[backend]
kind = "mock"
mock_tokens_per_second = {TOKENS_PER_SECOND}

[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"

[tiers.open]
requests = "100000/minute"
tokens = "1000000/minute"
concurrency = 8

[tiers.untouched]
requests = "10/day"
tokens = "1000/day"
concurrency = 1

[[keys]]
key = "{KEY}"
tier = "open"

[[keys]]
key = "{UNTOUCHED}"
tier = "untouched"
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuotagateProcess]:
    path: Path = tmp_path_factory.mktemp("timeout") / "gateway.toml"
    path.write_text(CONFIG, "utf-8")
    with QuotagateProcess("serve", "--config", str(path), "--port", "{port}") as process:
        yield process


def completion(
    max_tokens: int, *, content_length: int | None = None, key: str = KEY
) -> tuple[bytes, bytes]:
    """A POST /v1/completions head and its body (``content_length`` may promise more)."""
    body = json.dumps({"prompt": "x", "max_tokens": max_tokens}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"X-API-Key: " + key.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (content_length or len(body))
    )
    return head, body


async def until_closed(reader: asyncio.StreamReader, seconds: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (the test fails if it does
    not within ``seconds``)."""
    async with asyncio.timeout(seconds):
        return await reader.read()


def complete_answers(data: bytes) -> tuple[list[tuple[int, dict[str, Any]]], bytes]:
    """The status and JSON body of each whole response at the start of ``data``
    (Content-Length framed), and the bytes after them."""
    out = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        size = int(fields[b"content-length"])
        if len(rest) < size:
            break
        out.append((int(lines[0].split()[1]), json.loads(rest[:size])))
        data = rest[size:]
    return out, data


def answers(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Every response in ``data``, which holds nothing else."""
    out, rest = complete_answers(data)
    assert rest == b"", rest
    return out


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def limits(gateway: QuotagateProcess, key: str = KEY) -> dict[str, int]:
    entries = httpx.get(
        f"{gateway.url}/v1/ratelimit", headers={"X-API-Key": key}, timeout=10
    ).json()["limits"]
    return {entry["name"]: entry["remaining"] for entry in entries}


def in_flight(gateway: QuotagateProcess) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return sample(metric_samples(text), "quotagate_in_flight", tier="open")


def is_timeout_answer(status: int, body: dict[str, Any]) -> bool:
    return status == 408 and error_code(body) == "request_timeout" and "1 seconds" in str(body)


async def test_a_head_not_finished_in_time_gets_408_and_the_connection_closes(
    gateway: QuotagateProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-API-Key: ")
    data = await until_closed(reader)
    waited = time.monotonic() - started
    await closed(writer)
    [(status, body)] = answers(data)
    assert is_timeout_answer(status, body), (status, body)
    assert b"connection: close" in data.lower()
    assert waited >= TIMEOUT_S * 0.9  # not before the deadline


async def test_a_body_not_finished_in_time_gets_408_and_nothing_is_charged(
    gateway: QuotagateProcess,
) -> None:
    before = limits(gateway, UNTOUCHED)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head, body = completion(2, content_length=1000, key=UNTOUCHED)
    writer.write(head + body)  # 1000 bytes promised, a few dozen sent
    data = await until_closed(reader)
    await closed(writer)
    [(status, answer)] = answers(data)
    assert is_timeout_answer(status, answer), (status, answer)
    # The gateway read a disconnect instead of a body: no decision, no charge, no lease.
    assert before == {"requests": 10, "tokens": 1000, "concurrency": 1}
    assert limits(gateway, UNTOUCHED) == before
    assert in_flight(gateway) == 0


async def test_a_client_trickling_bytes_is_cut_at_the_deadline(
    gateway: QuotagateProcess,
) -> None:
    """A byte every 0.2 s: each byte would reset a per-read timer; the deadline holds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head, _ = completion(2)

    async def trickle() -> int:
        sent = 0
        for byte in head[:-4]:  # never the blank line that ends the head
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.2)
        return sent

    sender = asyncio.create_task(trickle())
    data = await until_closed(reader)
    sent = await sender
    await closed(writer)
    [(status, body)] = answers(data)
    assert is_timeout_answer(status, body), (status, body)
    assert sent < len(head) - 4  # cut while still trickling


async def test_a_second_request_stalled_after_an_answer_gets_408(
    gateway: QuotagateProcess,
) -> None:
    """Keep-alive: one request answered at once, then half of the next: the deadline runs
    again from the answer (and the idle keep-alive timer does not, once a byte came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head, body = completion(1)
    writer.write(head + body)
    first = await reader.readuntil(b"\r\n\r\n")
    size = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    answered = first + await reader.readexactly(size)
    answered_at = time.monotonic()
    writer.write(head[:30])
    data = await until_closed(reader)
    waited = time.monotonic() - answered_at
    await closed(writer)
    [(status, _)] = answers(answered)
    [(late, timed_out)] = answers(data)
    assert status == 200
    assert is_timeout_answer(late, timed_out), (late, timed_out)
    assert waited >= TIMEOUT_S * 0.9


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    gateway: QuotagateProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    data = await until_closed(reader)
    waited = time.monotonic() - started
    await closed(writer)
    assert data == b""
    assert waited >= TIMEOUT_S * 0.9


async def test_a_slow_answer_is_not_cut_and_the_connection_stays_usable(
    gateway: QuotagateProcess,
) -> None:
    """A whole request whose answer takes twice the timeout: answered in full; then a second
    request on the same keep-alive connection is answered too."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        started = time.monotonic()
        slow = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 20}, headers={"X-API-Key": KEY}
        )
        took = time.monotonic() - started
        again = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-API-Key": KEY}
        )
    assert slow.status_code == 200, slow.text
    assert slow.json()["usage"]["completion_tokens"] == 20
    assert took > TIMEOUT_S  # the answer really outlasted the request timeout
    assert again.status_code == 200, again.text


async def test_a_slow_stream_is_not_cut(gateway: QuotagateProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        body = {"prompt": "x", "max_tokens": 20, "stream": True}
        async with client.stream(
            "POST", "/v1/completions", json=body, headers={"X-API-Key": KEY}
        ) as response:
            text = (await response.aread()).decode()
    assert response.status_code == 200
    assert text.rstrip().endswith("data: [DONE]")


async def test_pipelined_requests_behind_a_slow_answer(gateway: QuotagateProcess) -> None:
    """Two whole requests in one write, both slow: both answered (the second arrived whole
    before the first's answer ended, so no deadline runs while it is worked on). Then two slow
    ones and a third half sent: the slow ones are answered in full (the deadline waits for the
    answers before it), then the third gets the 408."""
    head, body = completion(20)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head + body + head + body)
    data = b""
    async with asyncio.timeout(20):
        while len(complete_answers(data)[0]) < 2:
            chunk = await reader.read(65536)
            assert chunk, f"closed early: {data!r}"
            data += chunk
    await closed(writer)
    assert [status for status, _ in answers(data)] == [200, 200]

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head + body + head + body + head[:20])
    data = await until_closed(reader, 20)
    await closed(writer)
    *slow, (late, timed_out) = answers(data)
    assert [status for status, _ in slow] == [200, 200]
    for _, answer in slow:
        assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 20, "total_tokens": 21}
    assert is_timeout_answer(late, timed_out), (late, timed_out)

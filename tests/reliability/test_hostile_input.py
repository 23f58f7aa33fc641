"""Hand-made bad input against a real ``quotagate serve`` process, over raw sockets so that the
bytes on the wire are exactly the ones named: the table of statuses each must get, bodies too
large for memory, proxy-header spoofs, HTTP/1.1 pipelining, and clients that stall."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_kit import (
    KEY_PRO,
    Gateway,
    RawAnswer,
    config_text,
    http_client,
    metrics_of,
    percentile,
    ratelimit_of,
    read_answers,
    render,
    sample,
)

from helpers import RecordingUpstream, base_config, error_code, error_of, gateway_app, in_process
from support import Stopwatch

pytestmark = pytest.mark.reliability

MAX_BODY = 1_048_576
MiB = 1 << 20
TRUSTED_PROXY = "127.0.0.2"  # a loopback source address the tests bind to
SECOND_PROXY = "127.0.0.3"
UNTRUSTED_PEER = "127.0.0.4"  # not a trusted proxy: what it forwards is not believed

TIERS = f"""
[tiers.pro]
requests = "1000000/minute"
tokens = "5000000/minute"
concurrency = 64
default_max_tokens = 16

[tiers.anon]
requests = "5/minute"
tokens = "100000/minute"

[[keys]]
key = "{KEY_PRO}"
tier = "pro"
"""


REQUEST_TIMEOUT_S = 3  # a client sending a request for longer gets a 408


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = (
        f'trusted_proxies = ["{TRUSTED_PROXY}/32", "{SECOND_PROXY}/32"]\n'
        f"max_body_bytes = {MAX_BODY}\n"
        f"request_timeout_s = {REQUEST_TIMEOUT_S}"
    )
    process = Gateway(
        config_text(TIERS, server=server, anonymous="anon"), tmp_path_factory.mktemp("hostile")
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def exchange(
    port: int, data: bytes, answers: int = 1, seconds: float = 10
) -> list[RawAnswer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(seconds):
            return await read_answers(reader, answers)
    finally:
        writer.close()


def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    return render(
        "POST",
        path,
        headers={"X-API-Key": KEY_PRO, "Content-Type": "application/json", **(headers or {})},
        body=body,
    )


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat(**fields: Any) -> bytes:
    return post(CHAT, json.dumps({**OK_CHAT, **fields}).encode())


def chat_without(name: str) -> bytes:
    return post(CHAT, json.dumps({k: v for k, v in OK_CHAT.items() if k != name}).encode())


#: (id, raw request, the statuses it may get, the JSON ``error`` it must name or None)
BAD_INPUTS: list[tuple[str, bytes, set[int], str | None]] = [
    ("malformed JSON", post(CHAT, b'{"messages": [{"role": "user"'), {400}, "invalid_json"),
    ("JSON array body", post(CHAT, b"[1, 2, 3]"), {400}, "invalid_json"),
    ("NaN in JSON", post(CHAT, b'{"messages": [], "temperature": NaN}'), {400}, "invalid_json"),
    ("lone surrogate", post(CHAT, rb'{"messages": [{"role": "user", "content": "\ud800"}]}'),
     {400}, "invalid_json"),
    ("nested 100,000 deep", post(CHAT, b"[" * 100_000 + b"]" * 100_000), {400}, "invalid_json"),
    ("non-UTF-8 body", post(CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
     {400}, "invalid_json"),
    ("messages a string", chat(messages="hello"), {400}, "invalid_request"),
    ("message without role", chat(messages=[{"content": "hi"}]), {400}, "invalid_request"),
    ("content a number", chat(messages=[{"role": "user", "content": 5}]), {400},
     "invalid_request"),
    ("max_tokens a string", chat(max_tokens="ten"), {400}, "invalid_request"),
    ("max_tokens a float", chat(max_tokens=4.5), {400}, "invalid_request"),
    ("max_tokens boolean", chat(max_tokens=True), {400}, "invalid_request"),
    ("stream a string", chat(stream="yes"), {400}, "invalid_request"),
    ("n boolean", chat(n=True), {400}, "invalid_request"),
    ("model a number", chat(model=5), {400}, "invalid_request"),
    ("max_tokens negative", chat(max_tokens=-1), {400}, "invalid_request"),
    ("max_tokens zero", chat(max_tokens=0), {400}, "invalid_request"),
    ("max_tokens 10**30", chat(max_tokens=10**30), {400}, "invalid_request"),
    ("max_tokens 10,000,000 (over every limit)", chat(max_tokens=10_000_000), {429},
     "request_too_large"),
    ("n 129", chat(n=129), {400}, "invalid_request"),
    ("missing messages", chat_without("messages"), {400}, "invalid_request"),
    ("empty messages", chat(messages=[]), {400}, "invalid_request"),
    ("missing prompt", post(COMPLETIONS, b'{"max_tokens": 4}'), {400}, "invalid_request"),
    ("empty body", post(CHAT, b""), {400}, "invalid_json"),
    ("unknown fields", chat(top_k=5, guided_json={"type": "object"}, x_vendor=[1, 2]), {200},
     None),
    ("10 KB API key", post(CHAT, json.dumps(OK_CHAT).encode(), {"X-API-Key": "k" * 10240}),
     {401}, "invalid_api_key"),
    ("non-UTF-8 API key", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"X-API-Key: sk-\xff\xfe\xfd\r\nContent-Length: 2\r\n\r\n{}", {401}, "invalid_api_key"),
    ("Bearer with no token", post(CHAT, json.dumps(OK_CHAT).encode(),
                                  {"X-API-Key": "", "Authorization": "Bearer "}), {200, 429},
     None),
    # server.max_header_bytes (32 KiB by default) bounds the request head; 16 MB of header is
    # its own test below.
    ("64 KB header", post(CHAT, json.dumps(OK_CHAT).encode(), {"X-Junk": "a" * 65536}),
     {431}, "headers_too_large"),
    ("5,000 headers", post(CHAT, json.dumps(OK_CHAT).encode(),
                           {f"X-H{i}": "v" for i in range(5000)}), {431}, "headers_too_large"),
    ("body over max_body_bytes", post(CHAT, b" " * (MAX_BODY + 1)), {413}, "body_too_large"),
    ("text/plain JSON", render("POST", CHAT, headers={"X-API-Key": KEY_PRO, "Content-Type":
                               "text/plain"}, body=json.dumps(OK_CHAT).encode()), {200}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "expected", "error"),
    [pytest.param(raw, statuses, error, id=name) for name, raw, statuses, error in BAD_INPUTS],
)
async def test_bad_input_gets_its_status_and_a_json_error(
    gateway: Gateway, request_bytes: bytes, expected: set[int], error: str | None
) -> None:
    (answer,) = await exchange(gateway.port, request_bytes)
    assert answer.status in expected, (answer.status, answer.body[:300])
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    if error is not None:
        assert error_code(body) == error, body
        assert isinstance(error_of(body)["message"], str)
    if answer.status == 400 and error_code(body) == "invalid_request":
        assert error_of(body)["param"] in error_of(body)["message"]  # the error names the field
    assert gateway.process is not None
    assert gateway.process.poll() is None


async def test_malformed_http_is_refused_by_the_server_not_a_500(gateway: Gateway) -> None:
    """Below the app, uvicorn answers broken HTTP itself: a 400 with a text body (the one error
    that is not JSON, since the app never sees the request)."""
    (answer,) = await exchange(
        gateway.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    )
    assert answer.status == 400


async def test_unknown_fields_are_forwarded_upstream(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    app = gateway_app(base_config(tmp_path), backend=upstream.backend())
    extra = {"top_k": 5, "guided_json": {"type": "object"}, "x_vendor": [1, 2]}
    async with in_process(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={**OK_CHAT, **extra},
            headers={"X-API-Key": "sk-bob-0002"},
        )
    assert response.status_code == 200, response.text
    assert {k: upstream.bodies[0][k] for k in extra} == extra


async def test_a_declared_10_mb_body_is_refused_before_it_is_sent(
    gateway: Gateway, figures: dict[str, Any]
) -> None:
    rss_before = gateway.rss_kib()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        head = render("POST", CHAT, headers={"X-API-Key": KEY_PRO}).rstrip(b"\r\n")
        writer.write(head + f"\r\nContent-Length: {10 * MiB}\r\n\r\n".encode())
        started = time.monotonic()
        async with asyncio.timeout(10):  # not one byte of the body has been sent
            (answer,) = await read_answers(reader)
        seconds = time.monotonic() - started
    finally:
        writer.close()
    growth = gateway.rss_kib() - rss_before
    figures.update(status=answer.status, answered_after_ms=round(seconds * 1000, 1),
                   body_bytes_sent=0, rss_growth_kib=growth)  # fmt: skip
    assert answer.status == 413
    assert error_code(answer.json()) == "body_too_large"
    assert growth < 2048


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_10_mb_body_is_not_read_into_memory(
    gateway: Gateway, framing: str, figures: dict[str, Any]
) -> None:
    """The client pushes all 10 MB without waiting; the gateway answers 413 once it has seen
    max_body_bytes and never holds the rest (its peak RSS does not grow by ~10 MB)."""
    rss_before = peak = gateway.rss_kib()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    piece = b"x" * (64 * 1024)
    sent = 0
    answer: RawAnswer | None = None
    try:
        head = render("POST", CHAT, headers={"X-API-Key": KEY_PRO}).rstrip(b"\r\n")
        if framing == "chunked":
            writer.write(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(head + f"\r\nContent-Length: {10 * MiB}\r\n\r\n".encode())
        reading = asyncio.ensure_future(read_answers(reader))
        answered_at: int | None = None
        async with asyncio.timeout(20):
            while sent < 10 * MiB:
                if reading.done() and answered_at is None:
                    answered_at = sent
                data = b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece
                writer.write(data)
                try:
                    await writer.drain()
                except ConnectionError:
                    break  # the server answered and closed: the rest is never read
                sent += len(piece)
                peak = max(peak, gateway.rss_kib())  # sampled after every 64 KB written
            (answer,) = await reading
    finally:
        writer.close()
    growth = gateway.rss_kib() - rss_before
    peak_growth = max(peak, gateway.rss_kib()) - rss_before
    figures.update(status=answer.status if answer else None, body_bytes_written=sent,
                   bytes_written_when_answered=answered_at,
                   rss_growth_kib=growth, peak_rss_growth_kib=peak_growth)  # fmt: skip
    assert answer is not None
    assert answer.status == 413
    assert peak_growth < 4 * 1024, "the gateway held a large part of the 10 MB body"


async def test_a_huge_header_block_is_refused_without_buffering_it(
    gateway: Gateway, figures: dict[str, Any]
) -> None:
    """16 MB of header: the gateway stops reading at ``server.max_header_bytes`` (431, then
    it closes), or a few such clients would exhaust its memory. (Found by this suite: uvicorn's
    httptools parser has no header limit and buffered all of it.)"""
    rss_before = gateway.rss_kib()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    sent, closed_early = 0, False
    peak = rss_before
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        async with asyncio.timeout(30):
            while sent < 16 * MiB:
                writer.write(b"a" * MiB)
                try:
                    await writer.drain()
                except ConnectionError:
                    closed_early = True
                    break
                sent += MiB
            peak = max(peak, gateway.rss_kib())
            if not closed_early:
                writer.write(b"\r\nContent-Length: 2\r\n\r\n{}")
            try:
                (answer,) = await read_answers(reader)
                status: int | str = answer.status
            except ConnectionError:
                status = "closed"
    finally:
        writer.close()
    growth_kib = peak - rss_before
    figures.update(header_bytes_sent=sent, answer=status, rss_growth_kib=growth_kib)
    assert growth_kib < 8 * 1024, f"RSS grew {growth_kib} KiB for a {sent}-byte header"
    assert status in (431, "closed")
    assert sent < 16 * MiB  # it stopped reading long before the end


async def test_an_untrusted_peer_cannot_spoof_its_address(
    gateway: Gateway, figures: dict[str, Any]
) -> None:
    """Anonymous tier (5/minute by IP): requests from an untrusted loopback peer, each claiming
    another client in X-Forwarded-For and Forwarded, all count against the peer until it is
    out. (A peer address of its own, so its bucket is full when the test starts: 127.0.0.1's is
    shared with the other tests, and a bucket part used refills at an unknown phase.)"""
    transport = httpx.AsyncHTTPTransport(local_address=UNTRUSTED_PEER)
    async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=10) as client:
        start = await client.get(f"{gateway.url}/v1/ratelimit")
        left = next(e for e in start.json()["limits"] if e["name"] == "requests")["remaining"]
        statuses, seen_as = [], set()
        with Stopwatch() as watch:
            for i in range(left + 1):
                spoof = {"X-Forwarded-For": f"203.0.113.{i + 1}", "Forwarded": f"for=203.0.113.{i}"}
                response = await client.post(
                    f"{gateway.url}{COMPLETIONS}",
                    json={"prompt": "x", "max_tokens": 2},
                    headers=spoof,
                )
                statuses.append(response.status_code)
                whoami = await client.get(f"{gateway.url}/v1/ratelimit", headers=spoof)
                seen_as.add(whoami.json()["client"])
    figures.update(statuses=statuses, seen_as=sorted(seen_as))
    assert seen_as == {f"ip:{UNTRUSTED_PEER}"}
    assert left == 5
    # The sixth is refused, unless one request came back meanwhile (one per 12 s).
    admitted = statuses.count(200)
    assert left <= admitted <= left + watch.refills(12), (statuses, watch.seconds)
    assert statuses == [200] * admitted + [429] * (left + 1 - admitted)


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        pytest.param(TRUSTED_PROXY, {"X-Forwarded-For": "203.0.113.9"}, "203.0.113.9", id="xff"),
        pytest.param(
            TRUSTED_PROXY,
            {"X-Forwarded-For": f"198.51.100.66, 203.0.113.10, {SECOND_PROXY}"},
            "203.0.113.10",
            id="xff-chain-of-two-trusted-proxies",
        ),
        pytest.param(
            TRUSTED_PROXY,
            {"Forwarded": f'for=203.0.113.11;proto=https, for="{SECOND_PROXY}:8080"'},
            "203.0.113.11",
            id="forwarded-rfc7239",
        ),
        pytest.param(
            TRUSTED_PROXY,
            {"X-Forwarded-For": f"{SECOND_PROXY}, {TRUSTED_PROXY}"},
            SECOND_PROXY,
            id="every-hop-trusted-leftmost",
        ),
    ],
)
async def test_a_trusted_proxy_chain_is_honoured(
    gateway: Gateway, peer: str, headers: dict[str, str], client: str
) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=peer)
    async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=10) as http:
        whoami = await http.get(f"{gateway.url}/v1/ratelimit", headers=headers)
        first = await http.post(
            f"{gateway.url}{COMPLETIONS}", json={"prompt": "x", "max_tokens": 2}, headers=headers
        )
        state = await http.get(f"{gateway.url}/v1/ratelimit", headers=headers)
    assert whoami.json()["client"] == f"ip:{client}"
    assert first.status_code == 200
    # The request was counted against the forwarded client, not the proxy.
    requests_left = next(e for e in state.json()["limits"] if e["name"] == "requests")
    assert requests_left["remaining"] == 4


async def test_http_1_1_pipelining_answers_in_order(gateway: Gateway) -> None:
    requests = [
        render("GET", "/health"),
        post(COMPLETIONS, b'{"prompt": "x", "max_tokens": 3}'),
        render("GET", "/v1/models", headers={"X-API-Key": KEY_PRO}),
        post(CHAT, b"{not json"),
        post(COMPLETIONS, b'{"prompt": "x", "max_tokens": 5}'),
    ]
    answers = await exchange(gateway.port, b"".join(requests), answers=len(requests))
    assert [a.status for a in answers] == [200, 200, 200, 400, 200]
    assert answers[0].json()["status"] == "ok"
    assert answers[1].json()["usage"]["completion_tokens"] == 3
    assert answers[2].json()["object"] == "list"
    assert error_code(answers[3].json()) == "invalid_json"
    assert answers[4].json()["usage"]["completion_tokens"] == 5


async def test_clients_that_stall_do_not_hold_up_others(
    gateway: Gateway, figures: dict[str, Any]
) -> None:
    """One client sends half its body and stalls, another half its headers; meanwhile 100
    requests from other clients are served. At ``server.request_timeout_s`` the server answers
    both stalled ones 408 and closes their connections (uvicorn alone keeps them for ever)."""
    watch_seconds = REQUEST_TIMEOUT_S + 7.0
    async with http_client() as client:
        before = await ratelimit_of(client, gateway.url, KEY_PRO)
        half_body = await asyncio.open_connection("127.0.0.1", gateway.port)
        half_head = await asyncio.open_connection("127.0.0.1", gateway.port)
        head = render("POST", CHAT, headers={"X-API-Key": KEY_PRO}).rstrip(b"\r\n")
        half_body[1].write(head + b"\r\nContent-Length: 1000\r\n\r\n" + b"{" + b" " * 499)
        half_head[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-API-Key: ")
        stalled_at = time.monotonic()

        async def one() -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post(
                f"{gateway.url}{COMPLETIONS}",
                json={"prompt": "x", "max_tokens": 2},
                headers={"X-API-Key": KEY_PRO},
            )
            return response.status_code, time.monotonic() - started

        others = await asyncio.gather(*(one() for _ in range(100)))
        in_flight_while_stalled = sample(
            await metrics_of(client, gateway.url), "quotagate_in_flight", tier="pro"
        )

        async def closed_by_server(reader: asyncio.StreamReader) -> tuple[bytes, float | None]:
            """What the server sent the stalled connection, and seconds until it closed it."""
            try:
                async with asyncio.timeout(watch_seconds - (time.monotonic() - stalled_at)):
                    data = await reader.read()
                return data, time.monotonic() - stalled_at
            except TimeoutError:
                return b"", None

        (body_answer, body_closed), (head_answer, head_closed) = await asyncio.gather(
            closed_by_server(half_body[0]), closed_by_server(half_head[0])
        )
        half_body[1].close()
        half_head[1].close()
        after = await ratelimit_of(client, gateway.url, KEY_PRO)
    latencies = [seconds for _, seconds in others]
    figures.update(
        other_requests=len(others),
        other_statuses=sorted({status for status, _ in others}),
        other_p99_ms=round(percentile(latencies, 99) * 1000, 1),
        half_body_closed_by_server_after_s=body_closed or f"still open at {watch_seconds} s",
        half_headers_closed_by_server_after_s=head_closed or f"still open at {watch_seconds} s",
        half_body_answer=body_answer.split(b"\r\n", 1)[0].decode(errors="replace"),
        half_headers_answer=head_answer.split(b"\r\n", 1)[0].decode(errors="replace"),
        in_flight_while_stalled=in_flight_while_stalled,
    )
    assert [status for status, _ in others] == [200] * 100
    assert percentile(latencies, 99) < 2.0  # served, not hung behind the stalled ones
    # The stalled request never reached a decision: nothing was charged or held for it.
    assert in_flight_while_stalled == 0
    assert after["concurrency"]["remaining"] == before["concurrency"]["remaining"]
    for answer, closed_after in ((body_answer, body_closed), (head_answer, head_closed)):
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"code": "request_timeout"' in answer
        assert closed_after is not None
        assert closed_after >= REQUEST_TIMEOUT_S * 0.9

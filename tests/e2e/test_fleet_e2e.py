"""``quotagate serve`` in front of a fleet (issue 13), end to end: every model server is a
``quotagate mock`` process on a loopback port, the gateway a real ``quotagate serve --config``
process, the clients httpx and the official ``openai`` SDK.

What each replica received is read from the replica itself (its ``GET /stats`` counts the
completion requests that reached it), so "served exactly once" and "the removed replica got
nothing more" are counts, not inferences. Streams that must be caught in flight are slowed by
the mocks' ``--tokens-per-second``; every wait is a condition polled with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleet_kit import (
    COUNTED_KEY,
    KEY,
    MOCK_TOKENS,
    Answer,
    ClosingServer,
    FleetGateway,
    Load,
    MockReplica,
    Samples,
    Wiretap,
    ask,
    ask_many,
    backend,
    fleet_config,
    metrics_of,
    remaining,
    sample,
    start_all,
)

from helpers import error_code, error_of, mock_text
from quotagate.testing import async_wait_until, free_port

BIG = "llama-3-70b"
SMALL = "phi-3"
ALIAS = "gpt-4o-mini"
#: Tokens a second of the slow mocks: a whole 24-token answer takes 6 s, so a stream started
#: now is still in flight when the test kills or removes its replica a moment later.
SLOW = 4.0
#: The probe interval of the tests about health: a replica back up is seen within this.
PROBE_INTERVAL = 0.5
#: How long a restarted backend may take to be served again: "within one probe interval", with
#: room for a busy 2-core machine (ten intervals).
BACK_WITHIN = 10 * PROBE_INTERVAL
WHOLE_ANSWER = "".join(mock_text(MOCK_TOKENS))

StartReplicas = Callable[..., list[MockReplica]]
Serve = Callable[[str], FleetGateway]


@pytest.fixture
def mock_replicas() -> Iterator[StartReplicas]:
    """``mock_replicas(n, *models, tokens_per_second=..., latency_ms=...)``: n mock model
    servers started side by side; every one is stopped by its process id at the end."""
    made: list[MockReplica] = []

    def start(
        count: int, *models: str, tokens_per_second: float = 0.0, latency_ms: float = 0.0
    ) -> list[MockReplica]:
        replicas = [
            MockReplica(*models, tokens_per_second=tokens_per_second, latency_ms=latency_ms)
            for _ in range(count)
        ]
        made.extend(replicas)
        start_all(replicas)
        return replicas

    yield start
    for replica in made:
        replica.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """``serve(config)``: ``quotagate serve`` with that config file, ready once it listens
    (its backends probed); stopped by its process id at the end. Its log stays in tmp_path."""
    made: list[FleetGateway] = []

    def start(config: str) -> FleetGateway:
        gateway = FleetGateway(config, tmp_path)
        made.append(gateway)
        gateway.start()
        return gateway

    yield start
    for gateway in made:
        gateway.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, trust_env=False, limits=limits) as c:
        yield c


async def health_of(client: httpx.AsyncClient, gateway: FleetGateway) -> dict[str, Any]:
    response = await client.get(f"{gateway.url}/health")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def replica_series(samples: Samples, name: str, backend_name: str, replica: MockReplica) -> float:
    return sample(samples, name, backend=backend_name, replica=replica.label)


def under_way(streams: list[Answer]) -> bool:
    """Every stream has had its first token (the role event, then a word)."""
    return all(s.events is not None and len(s.events) >= 2 for s in streams)


# --- a replica dies ------------------------------------------------------------------------


async def test_a_replica_killed_under_load_cuts_its_streams_and_the_others_carry_on(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    a, b = mock_replicas(2, tokens_per_second=SLOW)
    # A long probe interval: what takes A out of the rotation is the requests' own failures.
    gateway = serve(fleet_config(backend("big", [a, b], models=[BIG], health_interval_s=60)))
    streams = [Answer() for _ in range(8)]
    readers = [
        asyncio.create_task(ask(client, gateway, BIG, stream=True, max_tokens=None, into=s))
        for s in streams
    ]
    try:
        await async_wait_until(lambda: under_way(streams), 30, "every stream under way")
        on_a, on_b = await a.received(client), await b.received(client)
        finished_early = [s.describe() for s in streams if s.done]
        a.kill()  # SIGKILL: its streams are cut mid-answer
        after_kill = await ask_many(
            40, 4, lambda i: ask(client, gateway, BIG, stream=i % 2 == 1, max_tokens=2)
        )
        on_b_after = await b.received(client)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
    finally:
        for reader in readers:
            reader.cancel()

    assert finished_early == [], "a stream ended before the kill: the mocks are not slow enough"
    assert on_a + on_b == len(streams)
    assert on_a >= 1, (on_a, on_b)
    assert on_b >= 1, (on_a, on_b)
    # A's streams (as many as A received) end with an error event and no [DONE]; B's run on
    # to [DONE] with the whole answer.
    assert all(s.status == 200 for s in streams)
    cut = [s for s in streams if s.stream_error is not None]
    whole = [s for s in streams if s.done]
    assert len(cut) == on_a, [s.describe() for s in streams]
    assert all(isinstance(s.stream_error, dict) and s.stream_error.get("message") for s in cut)
    assert len(whole) == on_b, [s.describe() for s in streams]
    assert [s.text() for s in whole] == [WHOLE_ANSWER] * on_b
    # Every request sent after the kill was served, by B, once.
    assert sum(1 for answer in after_kill if answer.status >= 500) == 0
    assert [answer.describe() for answer in after_kill if not answer.ok] == []
    assert on_b_after - on_b == len(after_kill)


async def test_every_replica_of_a_backend_down_is_a_503_and_a_restart_brings_it_back(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    a1, a2, s = mock_replicas(3)
    gateway = serve(
        fleet_config(
            backend("big", [a1, a2], models=[BIG], health_interval_s=PROBE_INTERVAL),
            backend("small", [s], models=[SMALL], health_interval_s=PROBE_INTERVAL),
        )
    )
    assert (await ask(client, gateway, BIG)).ok

    a1.kill()
    a2.kill()

    async def big_is_down() -> bool:
        backends = (await health_of(client, gateway))["backends"]
        return bool(backends["big"]["healthy"] == 0)

    await async_wait_until(big_is_down, 20, "both replicas of big marked down")
    before = await remaining(client, gateway, COUNTED_KEY)
    refused = await ask_many(
        10,
        2,
        lambda i: ask(client, gateway, BIG, stream=i % 2 == 1, max_tokens=10, key=COUNTED_KEY),
    )
    after = await remaining(client, gateway, COUNTED_KEY)
    others = await ask_many(10, 2, lambda i: ask(client, gateway, SMALL, stream=i % 2 == 1))
    health = await health_of(client, gateway)
    down = await metrics_of(client, gateway)

    start_all([a1, a2])  # the same ports
    restarted = time.monotonic()

    async def big_serves() -> bool:
        return (await ask(client, gateway, BIG)).ok

    await async_wait_until(big_serves, 30, "big served again", interval=0.05)
    back_after = time.monotonic() - restarted

    async def both_healthy() -> bool:
        backends = (await health_of(client, gateway))["backends"]
        return bool(backends["big"]["healthy"] == 2)

    await async_wait_until(both_healthy, 30, "both replicas of big up")
    again = await ask_many(10, 2, lambda i: ask(client, gateway, BIG))
    served_by = [await a1.received(client), await a2.received(client)]
    health_again = await health_of(client, gateway)

    assert [(r.status, error_code(r.body)) for r in refused] == [(503, "backend_unavailable")] * 10
    # Retry-After: until the next probe (at most one interval away, and never below 1 s).
    assert [(r.headers.get("retry-after"), error_of(r.body)["retry_after"]) for r in refused] == [
        ("1", 1)
    ] * 10
    assert after == before, "a refused request and its tokens are given back"
    assert [answer.describe() for answer in others if not answer.ok] == []
    assert health["status"] == "degraded"
    assert health["backends"] == {
        "big": {"replicas": 2, "healthy": 0, "in_flight": 0, "queued": 0},
        "small": {"replicas": 1, "healthy": 1, "in_flight": 0, "queued": 0},
    }
    assert replica_series(down, "quotagate_backend_up", "big", a1) == 0
    assert replica_series(down, "quotagate_backend_up", "big", a2) == 0
    assert replica_series(down, "quotagate_backend_up", "small", s) == 1

    assert back_after <= BACK_WITHIN, f"served again {back_after:.2f} s after the restart"
    assert [answer.describe() for answer in again if not answer.ok] == []
    assert all(count >= 1 for count in served_by), served_by  # both back in the rotation
    assert health_again["status"] == "ok"


# --- a reload changes the fleet ------------------------------------------------------------


async def test_a_reload_under_load_adds_and_removes_replicas_and_drops_nothing(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    a, b, c = mock_replicas(3, tokens_per_second=SLOW)
    gateway = serve(fleet_config(backend("big", [a, b], models=[BIG])))
    long_streams = [Answer() for _ in range(4)]
    readers = [
        asyncio.create_task(ask(client, gateway, BIG, stream=True, max_tokens=None, into=s))
        for s in long_streams
    ]
    try:
        await async_wait_until(lambda: under_way(long_streams), 30, "the long streams under way")
        long_on_a = await a.received(client)
        async with Load(client, gateway, BIG) as load:
            await async_wait_until(lambda: len(load.answers) >= 10, 30, "the load under way")
            # The autoscaler's move: C added, A removed.
            await gateway.reload(fleet_config(backend("big", [b, c], models=[BIG])))
            at_reload = await metrics_of(client, gateway)
            on_a_at_reload = await a.received(client)

            async def c_takes_requests() -> bool:
                return await c.received(client) >= 5

            await async_wait_until(c_takes_requests, 30, "the new replica taking requests")

            async def a_is_drained() -> bool:
                samples = await metrics_of(client, gateway)
                return replica_series(samples, "quotagate_backend_in_flight", "big", a) == 0

            await async_wait_until(a_is_drained, 30, "the removed replica's requests finished")
            on_a_when_drained = await a.received(client)
            mark = len(load.answers)
            await async_wait_until(lambda: len(load.answers) >= mark + 30, 60, "30 answers more")
        on_a_at_end = await a.received(client)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
        health = await health_of(client, gateway)
        final = await metrics_of(client, gateway)
    finally:
        for reader in readers:
            reader.cancel()

    assert long_on_a >= 1, "no long stream went to A"
    # The reload took effect while A still carried some of them...
    assert replica_series(at_reload, "quotagate_backend_in_flight", "big", a) >= 1
    # ...and they, like every other request of the whole load, finished well.
    assert [s.describe() for s in long_streams if not s.ok] == []
    assert [s.text() for s in long_streams] == [WHOLE_ANSWER] * len(long_streams)
    assert load.failed() == []
    assert len(load.answers) >= 40
    assert await c.received(client) >= 5
    # At most what the load's workers had on their way to A as the reload came (one each)
    # reached it afterwards; nothing did once it was drained.
    assert on_a_when_drained - on_a_at_reload <= load.workers
    assert on_a_at_end == on_a_when_drained, "the removed replica got requests after the reload"
    assert health["backends"] == {"big": {"replicas": 2, "healthy": 2, "in_flight": 0, "queued": 0}}
    # The removed replica's series left with it; the new one has its own.
    assert ("quotagate_backend_up", frozenset({("backend", "big"), ("replica", a.label)})) not in (
        final
    )
    assert replica_series(final, "quotagate_backend_up", "big", c) == 1


async def test_a_reload_removes_a_backend_and_adds_an_alias(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    a, s = mock_replicas(2, tokens_per_second=SLOW)
    before = fleet_config(backend("big", [a], models=[BIG]), backend("small", [s], models=[SMALL]))
    gateway = serve(before)
    alias_before = await ask(client, gateway, ALIAS)
    small_stream = Answer()
    reader = asyncio.create_task(
        ask(client, gateway, SMALL, stream=True, max_tokens=None, into=small_stream)
    )
    try:
        await async_wait_until(lambda: under_way([small_stream]), 30, "the stream under way")
        await gateway.reload(fleet_config(backend("big", [a], models=[BIG], aliases={ALIAS: BIG})))
        small_after = await ask(client, gateway, SMALL)
        alias_after = await ask(client, gateway, ALIAS)
        listed = (await client.get(f"{gateway.url}/v1/models")).json()["data"]
        health = await health_of(client, gateway)
        await asyncio.wait_for(reader, 60)
    finally:
        reader.cancel()

    assert (alias_before.status, error_code(alias_before.body)) == (404, "model_not_found")
    assert (small_after.status, error_code(small_after.body)) == (404, "model_not_found")
    assert alias_after.ok, alias_after.describe()
    assert alias_after.body["model"] == ALIAS
    assert {entry["id"]: entry["owned_by"] for entry in listed} == {BIG: "big", ALIAS: "big"}
    assert set(health["backends"]) == {"big"}
    # The removed backend's stream, in flight at the reload, finished undisturbed.
    assert small_stream.done, small_stream.describe()
    assert small_stream.text() == WHOLE_ANSWER


# --- failover ------------------------------------------------------------------------------


@pytest.mark.parametrize("dead", ["never-started", "killed-after-its-probe"])
async def test_a_request_that_could_not_connect_is_served_by_another_replica_exactly_once(
    dead: str, mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    killed: MockReplica | None = None
    if dead == "never-started":
        # Nothing ever listens there. No health checks (interval 0): it is never marked down,
        # so every request the gate sends it must fail over.
        a, b = mock_replicas(2)
        dead_port, interval = free_port(), 0.0
    else:
        # It answered its start-up probe, then died; the next probe is a minute away, so only
        # the requests' own failures can take it out.
        killed, a, b = mock_replicas(3)
        dead_port, interval = killed.port, 60.0
    dead_label = f"127.0.0.1:{dead_port}"
    urls = [f"http://{dead_label}/v1", a.base, b.base]  # the dead one first
    gateway = serve(fleet_config(backend("big", urls, models=[BIG], health_interval_s=interval)))
    if killed is not None:
        killed.kill()

    sent = 30
    answers = await ask_many(
        sent, 3, lambda i: ask(client, gateway, BIG, stream=i % 2 == 1, max_tokens=2)
    )
    received = await a.received(client) + await b.received(client)
    samples = await metrics_of(client, gateway)

    def of(name: str, replica: str, **labels: str) -> float:
        return sample(samples, name, backend="big", replica=replica, **labels)

    failovers = of("quotagate_failovers_total", dead_label)
    assert [answer.describe() for answer in answers if not answer.ok] == []
    assert received == sent, "each request generated exactly once"
    assert failovers >= 1, "no request was sent to the dead replica: nothing failed over"
    assert failovers == of("quotagate_upstream_requests_total", dead_label, outcome="unavailable")
    ok = [of("quotagate_upstream_requests_total", r.label, outcome="ok") for r in (a, b)]
    assert sum(ok) == sent
    if killed is not None:
        assert of("quotagate_backend_up", dead_label) == 0
        assert gateway.count(f"backend big replica {dead_label} is down") == 1


async def test_a_request_a_killed_replica_had_received_is_not_sent_to_another(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    """The other half of failover: a request the model server may have started (its bytes
    sent, no answer yet) is never sent again: 502, its tokens given back."""
    # Each replica holds what it receives for 3 s before answering: time to kill one while
    # it has the request (its /stats counted it) and has sent no byte of answer.
    a, b = mock_replicas(2, latency_ms=3000)
    gateway = serve(fleet_config(backend("big", [a, b], models=[BIG], health_interval_s=60)))
    # Two at a time: least in flight puts one on each replica. The first pair leaves the
    # gateway a kept-alive connection to each replica, which the second pair goes out on.
    warm = await asyncio.gather(*(ask(client, gateway, BIG) for _ in range(2)))
    before = await remaining(client, gateway, COUNTED_KEY)
    answers = [
        asyncio.create_task(ask(client, gateway, BIG, max_tokens=5, key=COUNTED_KEY))
        for _ in range(2)
    ]
    try:

        async def both_hold_one() -> bool:
            return (await a.received(client), await b.received(client)) == (2, 2)

        await async_wait_until(both_hold_one, 30, "each replica holding one request")
        a.kill()
        results = await asyncio.wait_for(asyncio.gather(*answers), 60)
    finally:
        for answer in answers:
            answer.cancel()
    on_b = await b.received(client)
    after = await remaining(client, gateway, COUNTED_KEY)

    assert [r.status for r in warm] == [200, 200]
    assert on_b == 2, "the request A had received was generated again on B"
    assert sorted((r.status, error_code(r.body)) for r in results) == [
        (200, None),
        (502, "upstream_error"),
    ]
    served = next(r for r in results if r.status == 200)
    assert before["tokens"] - after["tokens"] == served.body["usage"]["total_tokens"]


async def test_a_request_whose_kept_alive_connection_closes_after_sending_is_not_sent_again(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    """The same, made exact: the replica has the request (its /stats counted it) when the
    connection it came on closes, and the replica lives on. Sent again, the replica would
    generate it twice."""
    (a,) = mock_replicas(1, latency_ms=3000)
    async with Wiretap(a.port) as tap:
        config = fleet_config(backend("big", [tap.base], models=[BIG], health_interval_s=60))
        gateway = await asyncio.to_thread(serve, config)
        warm = await ask(client, gateway, BIG)  # leaves a kept-alive connection to the replica
        before = await remaining(client, gateway, COUNTED_KEY)
        answer = asyncio.create_task(ask(client, gateway, BIG, max_tokens=5, key=COUNTED_KEY))
        try:

            async def replica_holds_it() -> bool:
                return await a.received(client) == 2

            await async_wait_until(replica_holds_it, 30, "the replica holding the request")
            tap.cut()
            result = await asyncio.wait_for(answer, 60)
        finally:
            answer.cancel()
        on_a = await a.received(client)
        after = await remaining(client, gateway, COUNTED_KEY)

    assert warm.ok
    assert on_a == 2, "the request the replica had received was sent to it again"
    assert (result.status, error_code(result.body)) == (502, "upstream_error")
    assert after["tokens"] == before["tokens"]


async def test_a_replica_that_closes_every_connection_gets_502s_never_a_500(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    """What a TCP proxy in front of a dead model server does: accept, then close at once. A
    request sent there may have been read, so it is a 502 (or, when it was not sent at all,
    served by the other replica); never the gateway's own 500."""
    (b,) = mock_replicas(1)
    async with ClosingServer() as closing:
        # No health checks: it is never marked down, so about half the requests go to it.
        config = fleet_config(backend("big", [closing.base, b], models=[BIG], health_interval_s=0))
        gateway = await asyncio.to_thread(serve, config)
        answers = await ask_many(100, 2, lambda i: ask(client, gateway, BIG))
        on_b = await b.received(client)
    outcomes = Counter((answer.status, error_code(answer.body)) for answer in answers)

    assert set(outcomes) <= {(200, None), (502, "upstream_error")}, outcomes
    assert outcomes[(200, None)] == on_b
    assert closing.accepted >= 1, "the gateway never tried the closing replica"


# --- names: aliases and the model list -----------------------------------------------------


async def test_the_openai_sdk_through_an_alias_sees_its_alias_and_the_replica_the_real_name(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    (a,) = mock_replicas(1)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]
    async with Wiretap(a.port) as tap:
        config = fleet_config(backend("big", [tap.base], models=[BIG], aliases={ALIAS: BIG}))
        # Off the loop: the gateway's start-up probe goes through the wiretap, which runs on it.
        gateway = await asyncio.to_thread(serve, config)
        sdk = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1",
            api_key=KEY,
            max_retries=0,
            timeout=30,
        )
        try:
            chat = await sdk.chat.completions.create(model=ALIAS, messages=messages, max_tokens=3)
            chat_stream = await sdk.chat.completions.create(
                model=ALIAS, messages=messages, max_tokens=3, stream=True
            )
            chat_chunks = [chunk async for chunk in chat_stream]
            text = await sdk.completions.create(model=ALIAS, prompt="hi", max_tokens=3)
            text_stream = await sdk.completions.create(
                model=ALIAS, prompt="hi", max_tokens=3, stream=True
            )
            text_chunks = [chunk async for chunk in text_stream]
            by_name = await sdk.chat.completions.create(model=BIG, messages=messages, max_tokens=3)
            listed = {model.id: model.owned_by async for model in sdk.models.list()}
        finally:
            await sdk.close()
        sent = [r for r in tap.requests() if r.method == "POST"]
    # The mock echoes whatever model it is sent: only the wiretap shows what the gateway sent.
    echo = {
        name: (
            await client.post(
                f"{a.base}/chat/completions", json={"model": name, "messages": messages}
            )
        ).json()["model"]
        for name in (ALIAS, BIG)
    }

    assert echo == {ALIAS: ALIAS, BIG: BIG}
    assert (chat.model, chat.choices[0].message.content) == (ALIAS, "".join(mock_text(3)))
    assert chat_chunks
    assert {chunk.model for chunk in chat_chunks} == {ALIAS}
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == (
        "".join(mock_text(3))
    )
    assert (text.model, text.choices[0].text) == (ALIAS, "".join(mock_text(3)))
    assert text_chunks
    assert {chunk.model for chunk in text_chunks} == {ALIAS}
    assert by_name.model == BIG
    assert listed == {BIG: "big", ALIAS: "big"}
    assert [(r.path, r.json()["model"], r.json().get("stream", False)) for r in sent] == [
        ("/v1/chat/completions", BIG, False),
        ("/v1/chat/completions", BIG, True),
        ("/v1/completions", BIG, False),
        ("/v1/completions", BIG, True),
        ("/v1/chat/completions", BIG, False),
    ]


async def test_v1_models_lists_each_model_and_alias_once_and_an_unknown_model_is_404_uncharged(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    (a,) = mock_replicas(1)
    # A backend with no models listed serves what its replicas' GET /models list: here one
    # name another backend already lists (the config's wins) and one of its own.
    (m,) = mock_replicas(1, "mistral-7b", BIG)
    gateway = serve(
        fleet_config(
            backend("big", [a], models=[BIG], aliases={ALIAS: BIG, "gpt-4o": BIG}),
            backend("small", kind="mock", models=["quotagate-mock"]),
            backend("listed", [m]),
        )
    )
    response = await client.get(f"{gateway.url}/v1/models")
    data = response.json()["data"]
    before = await remaining(client, gateway, COUNTED_KEY)
    unknown = [
        await ask(client, gateway, "no-such-model", stream=stream, key=COUNTED_KEY)
        for stream in (False, True)
    ]
    after_unknown = await remaining(client, gateway, COUNTED_KEY)
    served = [await ask(client, gateway, name, key=COUNTED_KEY) for name in ("mistral-7b", BIG)]
    after_served = await remaining(client, gateway, COUNTED_KEY)

    assert response.status_code == 200
    ids = [entry["id"] for entry in data]
    assert sorted(ids) == sorted(set(ids)), f"listed more than once: {ids}"
    assert {entry["id"]: entry["owned_by"] for entry in data} == {
        BIG: "big",
        ALIAS: "big",
        "gpt-4o": "big",
        "quotagate-mock": "small",
        "mistral-7b": "listed",
    }
    for answer in unknown:
        assert answer.status == 404
        assert error_code(answer.body) == "model_not_found"
        assert error_of(answer.body)["param"] == "model"
        assert "no-such-model" in error_of(answer.body)["message"]
    assert after_unknown == before, "a request for an unknown model was charged"
    assert [answer.describe() for answer in served if not answer.ok] == []
    assert after_served["requests"] == before["requests"] - 2  # what a charge looks like here
    assert (await a.received(client), await m.received(client)) == (1, 1)


# --- metrics -------------------------------------------------------------------------------


async def test_metrics_follow_each_backend_and_replica_through_a_death_and_failovers(
    mock_replicas: StartReplicas, serve: Serve, client: httpx.AsyncClient
) -> None:
    a, b, s = mock_replicas(3, tokens_per_second=SLOW)
    gateway = serve(
        fleet_config(
            backend("big", [a, b], models=[BIG], health_interval_s=60),
            backend("small", [s], models=[SMALL], health_interval_s=60),
        )
    )
    streams = [Answer(), Answer()]  # one on each replica of big: least in flight, then in turn
    readers = [
        asyncio.create_task(ask(client, gateway, BIG, stream=True, max_tokens=None, into=st))
        for st in streams
    ]
    try:
        await async_wait_until(lambda: under_way(streams), 30, "both streams under way")
        in_flight = await metrics_of(client, gateway)
        on_a = await a.received(client)
        a.kill()
        # One at a time: B carries a stream, so A (none in flight) is picked until it is down.
        after = [await ask(client, gateway, BIG) for _ in range(10)]
        small = [await ask(client, gateway, SMALL) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*readers), 60)
    finally:
        for reader in readers:
            reader.cancel()
    on_b, on_s = await b.received(client), await s.received(client)
    samples = await metrics_of(client, gateway)

    def of(name: str, backend_name: str, replica: MockReplica, **labels: str) -> float:
        return sample(samples, name, backend=backend_name, replica=replica.label, **labels)

    assert [answer.describe() for answer in after + small if not answer.ok] == []
    assert sorted(st.stream_error is not None for st in streams) == [False, True]
    # While both streams ran: one in flight on each replica of big, nothing queued.
    for replica in (a, b):
        assert replica_series(in_flight, "quotagate_backend_in_flight", "big", replica) == 1
    assert sample(in_flight, "quotagate_backend_queued", backend="big") == 0
    assert sample(in_flight, "quotagate_backend_queued", backend="small") == 0
    assert ("quotagate_backend_queued", frozenset({("backend", "small")})) in in_flight
    # After: A is down (its failures marked it), B and small's replica up, nothing in flight.
    assert [of("quotagate_backend_up", "big", r) for r in (a, b)] == [0, 1]
    assert of("quotagate_backend_up", "small", s) == 1
    assert [of("quotagate_backend_in_flight", "big", r) for r in (a, b)] == [0, 0]
    # Failovers off A, each one a request A could not be reached for.
    failovers = of("quotagate_failovers_total", "big", a)
    assert failovers >= 1
    assert failovers == of("quotagate_upstream_requests_total", "big", a, outcome="unavailable")
    assert of("quotagate_failovers_total", "big", b) == 0
    # Every request B and small's replica received counted once, as ok, with its first byte
    # timed once.
    assert of("quotagate_upstream_requests_total", "big", b, outcome="ok") == on_b
    assert of("quotagate_upstream_requests_total", "small", s, outcome="ok") == on_s == 3
    assert of("quotagate_upstream_first_byte_seconds_count", "big", b) == on_b
    assert of("quotagate_upstream_first_byte_seconds_bucket", "big", b, le="+Inf") == on_b
    assert of("quotagate_upstream_first_byte_seconds_count", "small", s) == on_s
    # A received one request, its stream, cut mid-answer: counted once, as an error.
    assert on_a == 1
    a_outcomes = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "quotagate_upstream_requests_total"
        and dict(labels).get("replica") == a.label
        and dict(labels)["outcome"] != "unavailable"
    }
    assert a_outcomes == {"error": 1}

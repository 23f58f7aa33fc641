"""The fleet in process: routing by model and alias, replica choice, the shared queue, health,
failover, ``/health``, ``/v1/models``, metrics and reload (the processes: ``tests/e2e``).

Replicas are ``httpx.MockTransport`` upstreams that answer as the mock model, record what they
received, and can be held, refuse connections (never reached) or fail after being reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest
from fleet_fakes import FLEET, A, B, C, Replicas, app_of, ask, fleet_text

from helpers import (
    ALICE,
    BOB,
    error_code,
    error_of,
    in_process,
    limits_of,
    metric_samples,
    sample,
    sse_events,
    until,
)
from quotagate.gateway.app import Gateway
from quotagate.testing import async_wait_until


async def test_the_model_picks_the_backend(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    async with in_process(app_of(tmp_path, replicas)) as client:
        big = await ask(client, "llama-3-70b", key=ALICE)
        small = await ask(client, "quotagate-mock", key=ALICE)
    assert big.status_code == small.status_code == 200
    assert big.json()["model"] == "llama-3-70b"
    assert small.json()["model"] == "quotagate-mock"
    received = [body["model"] for r in replicas.values() for body in r.bodies]
    assert received == ["llama-3-70b"]  # the mock backend answered in process


async def test_an_alias_is_sent_upstream_by_its_model_name_and_answered_by_the_alias(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A, B)
    async with in_process(app_of(tmp_path, replicas)) as client:
        plain = await ask(client, "gpt-4o-mini", key=ALICE)
        streamed = await ask(
            client, "gpt-4o-mini", stream=True, stream_options={"include_usage": True}, key=ALICE
        )
    assert plain.status_code == streamed.status_code == 200
    assert plain.json()["model"] == "gpt-4o-mini"
    assert plain.json()["usage"]["total_tokens"] > 0
    events = [json.loads(e) for e in sse_events(streamed.text) if e != "[DONE]"]
    assert events
    assert {event["model"] for event in events} == {"gpt-4o-mini"}
    assert [body["model"] for r in replicas.values() for body in r.bodies] == ["llama-3-70b"] * 2


async def test_per_model_tier_limits_count_the_name_the_client_sent(tmp_path: Path) -> None:
    """``[tiers.free.models."gpt-4o-mini"]`` allows 2/minute: the alias is limited, the model it
    stands for is not (same backend, same upstream name)."""
    async with in_process(app_of(tmp_path, Replicas(A, B))) as client:

        async def status(model: str) -> int:
            response = await ask(client, model, key=ALICE)
            return response.status_code

        aliased = [await status("gpt-4o-mini") for _ in range(3)]
        direct = [await status("llama-3-70b") for _ in range(3)]
    assert aliased == [200, 200, 429]
    assert direct == [200, 200, 200]


async def test_a_model_no_backend_serves_is_404_and_costs_nothing(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    async with in_process(app_of(tmp_path, replicas)) as client:
        before = await limits_of(client, ALICE)
        response = await ask(client, "gpt-5", key=ALICE)
        after = await limits_of(client, ALICE)
    assert response.status_code == 404
    body = response.json()
    assert error_code(body) == "model_not_found"
    assert error_of(body)["param"] == "model"
    assert "'gpt-5'" in error_of(body)["message"]
    assert after == before
    assert not any(r.bodies for r in replicas.values())


async def test_models_lists_every_model_and_alias_once_owned_by_its_backend(
    tmp_path: Path,
) -> None:
    """A backend that lists no models serves what its replicas' ``GET /models`` list (two
    replicas listing the same model: once)."""
    replicas = Replicas(A, B, C)
    replicas[C].models = ("qwen-7b", "phi-3")
    more = f"""
[[backends]]
name = "discovered"
kind = "openai"
urls = ["{C}"]
health_interval_s = 3600
"""
    async with in_process(app_of(tmp_path, replicas, fleet_text(more=more))) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        served = await ask(client, "phi-3", key=ALICE)
    assert [(m["id"], m["owned_by"]) for m in listed] == [
        ("llama-3-70b", "big"),
        ("gpt-4o-mini", "big"),
        ("quotagate-mock", "small"),
        ("qwen-7b", "discovered"),
        ("phi-3", "discovered"),
    ]
    assert served.status_code == 200
    assert [b["model"] for b in replicas[C].bodies] == ["phi-3"]


async def test_the_catch_all_takes_models_no_other_backend_lists(tmp_path: Path) -> None:
    replicas = Replicas(A, B, C)
    more = f"""
[[backends]]
name = "rest"
kind = "openai"
urls = ["{C}"]
models = ["*"]
health_interval_s = 3600
"""
    async with in_process(app_of(tmp_path, replicas, fleet_text(more=more))) as client:
        other = await ask(client, "anything-else", key=ALICE)
        listed = await ask(client, "llama-3-70b", key=ALICE)
    assert other.status_code == listed.status_code == 200
    assert [b["model"] for b in replicas[C].bodies] == ["anything-else"]
    assert [b["model"] for r in (replicas[A], replicas[B]) for b in r.bodies] == ["llama-3-70b"]


async def test_requests_go_to_the_replica_with_fewest_in_flight_ties_in_turn(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas)
    async with in_process(app) as client:
        for _ in range(4):  # one at a time: every choice is a tie
            assert (await ask(client)).status_code == 200
        assert [len(replicas[A].bodies), len(replicas[B].bodies)] == [2, 2]
        replicas[A].hold = replicas[B].hold = True
        held = [asyncio.create_task(ask(client))]
        await async_wait_until(lambda: replicas[A].waiting + replicas[B].waiting == 1, 10, "held")
        busy = A if replicas[A].waiting else B
        held.append(asyncio.create_task(ask(client)))
        await async_wait_until(lambda: replicas[A].waiting + replicas[B].waiting == 2, 10, "both")
        idle_got_it = replicas[A if busy == B else B].waiting == 1
        for r in replicas.values():
            r.release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    assert idle_got_it  # the second went to the replica with nothing in flight


async def test_one_queue_per_backend_in_priority_order_served_by_any_replica(
    tmp_path: Path,
) -> None:
    """Both replicas full (one slot each): a free request queues, then a pro one; the first
    slot to free, on either replica, serves the pro request."""
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas, fleet_text(concurrency=1))
    gate = app.state.gateway.fleet.pools["big"].gate
    async with in_process(app) as client:

        def send(prompt: str, key: str) -> asyncio.Task[httpx.Response]:
            body = {"model": "llama-3-70b", "prompt": prompt}
            return asyncio.create_task(
                client.post("/v1/completions", json=body, headers={"X-API-Key": key})
            )

        replicas[A].hold = replicas[B].hold = True
        busy = [send("busy-1", BOB), send("busy-2", BOB)]
        await async_wait_until(lambda: replicas[A].waiting == replicas[B].waiting == 1, 10, "full")
        queued = [send("free", ALICE)]
        await until(lambda: gate.queued == 1)
        queued.append(send("pro", BOB))
        await until(lambda: gate.queued == 2)
        replicas[B].release.set()  # B's slot frees first: the head of the queue takes it
        await async_wait_until(lambda: gate.queued == 0, 10, "the queue drained")
        replicas[A].release.set()
        responses = await asyncio.gather(*busy, *queued)
    assert [r.status_code for r in responses] == [200] * 4
    # B's slot freed first and served the head (pro), then the free request behind it.
    assert [b["prompt"] for b in replicas[B].bodies][1:] == ["pro", "free"]
    assert gate.in_flight == 0


async def test_a_request_that_could_not_reach_a_replica_is_served_by_another_once(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas)
    async with in_process(app) as client:
        replicas[A].refuse = True
        responses = [await ask(client) for _ in range(2)]
        metrics = metric_samples((await client.get("/metrics")).text)
    assert [r.status_code for r in responses] == [200, 200]
    assert len(replicas[B].bodies) == 2  # each served exactly once
    assert replicas[A].bodies == []
    labels = {"backend": "big", "replica": "a.test:8001"}
    failovers = sample(metrics, "quotagate_failovers_total", **labels)
    unreached = sample(
        metrics, "quotagate_upstream_requests_total", outcome="unavailable", **labels
    )
    ok = sample(
        metrics,
        "quotagate_upstream_requests_total",
        outcome="ok",
        backend="big",
        replica="b.test:8002",
    )
    # Ties go in turn: at least one of the two tried A first.
    assert failovers == unreached >= 1
    assert ok == 2


async def test_a_request_the_replica_may_have_started_is_never_sent_again(
    tmp_path: Path,
) -> None:
    """A 5xx (the replica was reached): 502 to the client, its tokens given back, and no
    second generation on the other replica."""
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas)
    async with in_process(app) as client:
        replicas[A].status = replicas[B].status = 500
        before = await limits_of(client, BOB)
        failed = await ask(client)
        after = await limits_of(client, BOB)
    assert failed.status_code == 502
    assert error_code(failed.json()) == "upstream_error"
    assert len(replicas[A].bodies) + len(replicas[B].bodies) == 1
    assert after["tokens"] == before["tokens"]


async def test_three_failures_in_a_row_mark_a_replica_down_and_a_probe_brings_it_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas)
    pool = app.state.gateway.fleet.pools["big"]
    caplog.set_level(logging.INFO, logger="quotagate")
    async with in_process(app) as client:
        replicas[A].refuse = True
        statuses = [(await ask(client)).status_code for _ in range(8)]
        down = [r.label for r in pool.replicas if not r.up]
        tried_while_down = len(replicas[B].bodies)
        statuses += [(await ask(client)).status_code for _ in range(4)]
        served_while_down = len(replicas[B].bodies) - tried_while_down
        replicas[A].refuse = False
        await pool.probe_all()
        up = all(r.up for r in pool.replicas)
        statuses += [(await ask(client)).status_code for _ in range(4)]
    assert statuses == [200] * 16  # every one served: failover, then the healthy replica
    assert down == ["a.test:8001"]
    assert served_while_down == 4  # B took them all: nothing went to A while down
    assert up
    assert len(replicas[A].bodies) >= 1  # back in the rotation
    messages = [
        (r.levelname, r.getMessage()) for r in caplog.records if "replica a.test" in r.getMessage()
    ]
    assert [level for level, _ in messages] == ["WARNING", "INFO"]  # each transition once
    assert "is down" in messages[0][1]
    assert "cannot connect" in messages[0][1]
    assert messages[1][1].endswith("is up")


async def test_no_healthy_replica_is_503_backend_unavailable_and_gives_all_back(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas)
    async with in_process(app) as client:
        before = await limits_of(client, BOB)
        replicas[A].refuse = replicas[B].refuse = True
        unavailable = [await ask(client) for _ in range(4)]
        after = await limits_of(client, BOB)
        other = await ask(client, "quotagate-mock")
        health = (await client.get("/health")).json()
    for response in unavailable:
        assert response.status_code == 503
        assert error_code(response.json()) == "backend_unavailable"
        assert int(response.headers["retry-after"]) >= 1
        assert error_of(response.json())["retry_after"] == int(response.headers["retry-after"])
    assert after["requests"] == before["requests"]
    assert after["tokens"] == before["tokens"]
    assert other.status_code == 200
    assert health["status"] == "degraded"
    assert health["backends"]["big"] == {"replicas": 2, "healthy": 0, "in_flight": 0, "queued": 0}
    assert health["backends"]["small"]["healthy"] == 1


async def test_health_counts_requests_in_flight_and_queued_per_backend(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas, fleet_text(concurrency=1))
    async with in_process(app) as client:
        replicas[A].hold = replicas[B].hold = True
        tasks = [asyncio.create_task(ask(client)) for _ in range(3)]
        await async_wait_until(
            lambda: app.state.gateway.fleet.pools["big"].gate.queued == 1, 10, "one queued"
        )
        health = (await client.get("/health")).json()
        metrics = metric_samples((await client.get("/metrics")).text)
        for r in replicas.values():
            r.release.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 3
    assert health["status"] == "ok"
    assert health["backends"]["big"] == {"replicas": 2, "healthy": 2, "in_flight": 2, "queued": 1}
    for replica in ("a.test:8001", "b.test:8002"):
        labels = {"backend": "big", "replica": replica}
        assert sample(metrics, "quotagate_backend_in_flight", **labels) == 1
        assert sample(metrics, "quotagate_backend_up", **labels) == 1
    assert sample(metrics, "quotagate_backend_queued", backend="big") == 1
    assert sample(metrics, "quotagate_backend_up", backend="small", replica="mock") == 1


async def test_time_to_first_byte_is_a_histogram_per_replica(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    async with in_process(app_of(tmp_path, replicas)) as client:
        for _ in range(2):
            await ask(client)
        metrics = metric_samples((await client.get("/metrics")).text)
    counts = [
        sample(metrics, "quotagate_upstream_first_byte_seconds_count", backend="big", replica=r)
        for r in ("a.test:8001", "b.test:8002")
    ]
    assert counts == [1, 1]


async def test_reload_adds_and_removes_replicas_without_dropping_a_request(
    tmp_path: Path,
) -> None:
    """A request held on A while a reload removes A (and adds C) finishes; new requests go to
    B and C only; A's client is closed once its request is done."""
    replicas = Replicas(A, B, C)
    app = app_of(tmp_path, replicas)
    gateway: Gateway = app.state.gateway
    pool = gateway.fleet.pools["big"]
    async with in_process(app) as client:
        replicas[A].hold = replicas[B].hold = True
        held = [asyncio.create_task(ask(client)), asyncio.create_task(ask(client))]
        await async_wait_until(lambda: replicas[A].waiting == replicas[B].waiting == 1, 10, "held")
        replicas[B].hold = False
        replicas[B].release.set()
        (tmp_path / "gateway.toml").write_text(fleet_text(urls=[B, C]), "utf-8")
        assert gateway.reload()
        after = [await ask(client) for _ in range(4)]
        retiring = [r.label for r in pool.retiring]
        replicas[A].release.set()
        first = await asyncio.gather(*held)
        await async_wait_until(lambda: not pool.retiring, 10, "A is closed")
        health = (await client.get("/health")).json()
    assert [r.status_code for r in [*first, *after]] == [200] * 6
    assert len(replicas[A].bodies) == 1  # only the one it had
    assert len(replicas[C].bodies) >= 1  # the new replica takes requests at once
    assert len(replicas[B].bodies) + len(replicas[C].bodies) == 5
    assert retiring == ["a.test:8001"]
    assert health["backends"]["big"]["replicas"] == 2


async def test_reload_removing_a_backend_answers_model_not_found_for_its_models(
    tmp_path: Path,
) -> None:
    replicas = Replicas(A, B)
    text = fleet_text()
    app = app_of(tmp_path, replicas, text)
    gateway: Gateway = app.state.gateway
    small_only = text[text.index('[[backends]]\nname = "small"') :]
    async with in_process(app) as client:
        before = await ask(client)
        (tmp_path / "gateway.toml").write_text(small_only, "utf-8")
        assert gateway.reload()
        gone = await ask(client, "gpt-4o-mini")
        kept = await ask(client, "quotagate-mock")
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert before.status_code == 200
    assert gone.status_code == 404
    assert error_code(gone.json()) == "model_not_found"
    assert kept.status_code == 200
    assert listed == ["quotagate-mock"]


async def test_reload_changes_a_backends_concurrency_and_queue_in_place(tmp_path: Path) -> None:
    replicas = Replicas(A, B)
    app = app_of(tmp_path, replicas, fleet_text(concurrency=1))
    gateway: Gateway = app.state.gateway
    pool = gateway.fleet.pools["big"]
    async with in_process(app) as client:
        replicas[A].hold = replicas[B].hold = True
        tasks = [asyncio.create_task(ask(client)) for _ in range(3)]
        await until(lambda: pool.gate.queued == 1)
        (tmp_path / "gateway.toml").write_text(fleet_text(concurrency=2), "utf-8")
        assert gateway.reload()
        await async_wait_until(lambda: pool.gate.queued == 0, 10, "the new slot served it")
        in_flight = pool.gate.in_flight
        for r in replicas.values():
            r.release.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 3
    assert in_flight == 3
    assert [r.max_concurrency for r in pool.replicas] == [2, 2]


async def test_without_a_catch_all_a_request_must_name_its_model(tmp_path: Path) -> None:
    async with in_process(app_of(tmp_path, Replicas(A, B))) as client:
        response = await client.post(
            "/v1/completions", json={"prompt": "hi"}, headers={"X-API-Key": BOB}
        )
    assert response.status_code == 404
    assert error_code(response.json()) == "model_not_found"
    assert error_of(response.json())["message"].startswith("model: required to choose a backend")


async def test_a_single_backend_table_reloaded_into_a_fleet_takes_the_fleet(
    tmp_path: Path,
) -> None:
    """``[backend]`` itself needs a restart; replacing it by ``[[backends]]`` is a fleet change,
    applied by the reload like any other."""
    replicas = Replicas(A, B)
    app = app_of(
        tmp_path, replicas, '[backend]\nkind = "mock"\n' + FLEET[FLEET.index("[tiers.free]") :]
    )
    gateway: Gateway = app.state.gateway
    async with in_process(app) as client:
        before = await ask(client, "anything")  # the single backend serves every model
        (tmp_path / "gateway.toml").write_text(fleet_text(), "utf-8")
        assert gateway.reload()
        after = await ask(client, "anything")
        routed = await ask(client)
    assert before.status_code == 200
    assert after.status_code == 404
    assert routed.status_code == 200
    assert len(replicas[A].bodies) + len(replicas[B].bodies) == 1
    assert list(gateway.fleet.pools) == ["big", "small"]

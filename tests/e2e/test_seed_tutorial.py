"""The seed tutorial's "Verification" and "Common failures" lists, run against
``examples/seed_tutorial.py`` served by real uvicorn processes, on memory and on real Redis.

Real processes decide by real time: at the tutorial's 10/minute one request comes back every
6 s, at 600/minute on /health every 0.1 s. A test about those numbers measures its requests
with a ``Stopwatch`` and allows for what can come back meanwhile; a test about something else
(who counts as a client, restarts, Redis) runs at 10/day (one back every 2.4 hours), where every
count is exact.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from support import RedisServer, Stopwatch, UvicornServer

EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
TUTORIAL = "10/minute"  # the tutorial's inference limit: one comes back every 6 s
EXACT = "10/day"  # the same capacity, one back every 2.4 hours: no refill during a test


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage_url(request: pytest.FixtureRequest, key_prefix: str) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix={key_prefix}"


def _serve(storage_url: str, limit: str = EXACT, **env: str) -> UvicornServer:
    return UvicornServer(
        "seed_tutorial:app",
        app_dir=EXAMPLES,
        env={"QUOTAGATE_STORAGE_URL": storage_url, "COMPLETIONS_LIMIT": limit, **env},
    )


@pytest.fixture
def server(storage_url: str) -> Iterator[UvicornServer]:
    """The tutorial's app at its own 10/minute."""
    with _serve(storage_url, TUTORIAL) as running:
        yield running


@pytest.fixture
def steady_server(storage_url: str) -> Iterator[UvicornServer]:
    """The same app at 10/day: counts do not move while a test runs."""
    with _serve(storage_url, EXACT) as running:
        yield running


def _complete(client: httpx.Client, key: str | None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["X-API-Key"] = key
    return client.post("/v1/completions", json={"prompt": "Hello"}, headers=headers)


def _new_key() -> str:
    return f"sk-test-{uuid.uuid4().hex}"


def test_ten_rapid_requests_then_the_eleventh_is_429(server: UvicornServer) -> None:
    key = _new_key()
    with httpx.Client(base_url=server.url) as client, Stopwatch() as watch:
        statuses = [_complete(client, key).status_code for _ in range(10)]
        eleventh = _complete(client, key)
        # Only a request that came back meanwhile (one per 6 s) admits another before the 429.
        while eleventh.status_code == 200 and len(statuses) < 10 + watch.refills(6):
            statuses.append(eleventh.status_code)
            eleventh = _complete(client, key)
    assert statuses == [200] * len(statuses)
    assert 10 <= len(statuses) <= 10 + watch.refills(6)
    assert eleventh.status_code == 429
    retry_after = int(eleventh.headers["Retry-After"])
    assert 1 <= retry_after <= 6  # 10/minute: one slot frees every 6 s
    assert eleventh.json() == {
        "error": "rate_limit_exceeded",
        "message": f"Too many requests. Try again in {retry_after} seconds.",
        "retry_after": retry_after,
    }
    assert eleventh.headers["content-type"] == "application/json"


def test_rate_limit_headers_on_every_successful_response(server: UvicornServer) -> None:
    key = _new_key()
    with httpx.Client(base_url=server.url) as client, Stopwatch() as watch:
        responses = [_complete(client, key) for _ in range(4)]
    assert [r.headers["X-RateLimit-Limit"] for r in responses] == ["10"] * 4
    remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in responses]
    reset = [int(r.headers["X-RateLimit-Reset"]) for r in responses]
    # 9, 8, 7, 6 left and full again in 6, 12, 18, 24 s (whole seconds, rounded up), less what
    # time gave back while the requests ran: a unit per 6 s, and the seconds themselves.
    for n, (left, full_in) in enumerate(zip(remaining, reset, strict=True), start=1):
        assert 10 - n <= left <= 10 - n + watch.refills(6), remaining
        assert 6 * n - int(watch.seconds) <= full_in <= 6 * n, reset
    assert responses[0].headers["RateLimit-Policy"] == '"10-per-minute";q=10;w=60'
    assert responses[3].headers["RateLimit"] == f'"10-per-minute";r={remaining[3]};t={reset[3]}'


def test_two_api_keys_are_counted_independently(steady_server: UvicornServer) -> None:
    alice, bob = _new_key(), _new_key()
    with httpx.Client(base_url=steady_server.url) as client:
        for _ in range(10):
            _complete(client, alice)
        assert _complete(client, alice).status_code == 429
        bob_first = _complete(client, bob)
        assert bob_first.status_code == 200
        assert bob_first.headers["X-RateLimit-Remaining"] == "9"
        # The bearer form names the same client as X-API-Key.
        assert (
            client.post(
                "/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {bob}"}
            ).headers["X-RateLimit-Remaining"]
            == "8"
        )


def test_health_is_not_limited_at_the_inference_threshold(server: UvicornServer) -> None:
    key = _new_key()
    with httpx.Client(base_url=server.url) as client:
        completions = [_complete(client, key).status_code for _ in range(11)]
        with Stopwatch() as watch:
            health = [client.get("/health", headers={"X-API-Key": key}) for _ in range(30)]
    assert completions[-1] == 429  # the inference limit is reached...
    assert [r.status_code for r in health] == [200] * 30  # ...and /health is not limited by it
    assert health[-1].headers["X-RateLimit-Limit"] == "600"
    # 600/minute: 570 left after 30, plus one back for every 0.1 s the 30 took.
    left = int(health[-1].headers["X-RateLimit-Remaining"])
    assert 570 <= left <= 570 + watch.refills(0.1), (left, watch.seconds)


def test_restart_or_flush_resets_counters(storage_url: str) -> None:
    key = _new_key()
    with _serve(storage_url) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(10):
            _complete(client, key)
        assert _complete(client, key).status_code == 429
        if storage_url.startswith("redis"):
            # Redis counters outlive a restart (that is the point); FLUSHDB resets them.
            server.restart()
            assert _complete(client, key).status_code == 429
            redis.Redis.from_url(storage_url.split("?")[0]).flushdb()
        else:
            server.restart()  # memory storage is per process
        after = _complete(client, key)
    assert after.status_code == 200
    assert after.headers["X-RateLimit-Remaining"] == "9"


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    steady_server: UvicornServer,
) -> None:
    with httpx.Client(base_url=steady_server.url) as client:
        for i in range(10):
            _complete(client, None, **{"X-Forwarded-For": f"198.51.100.{i}"})
        # Same peer (127.0.0.1) whatever the header says: one client, now over its limit.
        assert _complete(client, None, **{"X-Forwarded-For": "198.51.100.99"}).status_code == 429


def test_forwarded_for_from_a_trusted_proxy_names_the_client(storage_url: str) -> None:
    trusted = _serve(storage_url, QUOTAGATE_TRUSTED_PROXIES="127.0.0.1/32")
    with trusted as server, httpx.Client(base_url=server.url) as client:
        a, b = f"203.0.113.{uuid.uuid4().int % 250}", "2001:db8::7"
        for _ in range(10):
            _complete(client, None, **{"X-Forwarded-For": f"{a}, 127.0.0.1"})
        assert _complete(client, None, **{"X-Forwarded-For": a}).status_code == 429
        other = _complete(client, None, **{"Forwarded": f'for="[{b}]:4711"'})
        assert other.status_code == 200
        assert other.headers["X-RateLimit-Remaining"] == "9"


@pytest.mark.redis
def test_two_app_processes_sharing_redis_enforce_one_limit(
    redis_server: RedisServer, key_prefix: str
) -> None:
    url = f"{redis_server.url}?prefix={key_prefix}"
    key = _new_key()
    with _serve(url) as first, _serve(url) as second, httpx.Client() as client:
        statuses = [
            client.post(
                f"{server.url}/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": key}
            ).status_code
            for _ in range(10)
            for server in (first, second)
        ]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 10


@pytest.mark.redis
def test_redis_stopped_requests_are_still_limited_and_never_5xx(key_prefix: str) -> None:
    key = _new_key()
    with RedisServer() as redis_server, _serve(f"{redis_server.url}?prefix={key_prefix}") as server:
        with httpx.Client(base_url=server.url) as client:
            assert _complete(client, key).status_code == 200
            assert client.get("/health").json()["storage"] == "redis"
            redis_server.stop()
            statuses = [_complete(client, key).status_code for _ in range(12)]
            health = client.get("/health")
        log = server.output()
    # A fresh in-memory bucket of 10 after the outage began, then 429s: limited, never a 5xx.
    assert statuses == [200] * 10 + [429] * 2
    assert health.json()["storage"] == "fallback"
    assert log.count("shared storage unavailable") == 1
    assert "Traceback" not in log

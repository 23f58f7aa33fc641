"""Two `quotagate serve` processes on one real Redis, the `openai` SDK as the client: a key
created on A works on B at once; revoked on A, B refuses it within a second; rotated on B with
a grace, the old secret works on A until the grace ends; an expired key is refused; a key's
own limit holds across both; the usage summed on either is what the answers said."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from support import QuotagateProcess, RedisServer, python_env

pytestmark = pytest.mark.redis

ADMIN = "adm-e2e-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def config(redis_url: str, prefix: str) -> str:
    return f"""
[storage]
url = "{redis_url}"
prefix = "{prefix}"

[admin]
key_env = "QUOTAGATE_ADMIN_KEY"

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
"""


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[str, str]]:
    path = tmp_path_factory.mktemp("tenants") / "gateway.toml"
    path.write_text(config(redis_server.url, "e2e-tenants"), "utf-8")
    env = python_env(QUOTAGATE_ADMIN_KEY=ADMIN)
    serve = ("serve", "--config", str(path), "--port", "{port}")
    with QuotagateProcess(*serve, env=env) as a, QuotagateProcess(*serve, env=env) as b:
        yield a.url, b.url


def create(url: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}/admin/keys", json={"tier": "pro", **body}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert isinstance(created, dict)
    return created


def ask(url: str, key: str, max_tokens: int = 2) -> tuple[str | None, Any]:
    """``(error code or None, usage)`` of one completion through the SDK."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        answer = client.completions.create(
            model="quotagate-mock", prompt="hello there", max_tokens=max_tokens
        )
    except openai.APIStatusError as exc:
        return exc.code or str(exc.status_code), None
    return None, answer.usage


def seconds_until(condition: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started <= within, f"not within {within} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_created_on_a_works_on_b_and_revoked_on_a_is_refused_by_b_within_a_second(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    created = create(a)
    assert ask(b, created["key"])[0] is None  # at once: B asks the store
    assert httpx.delete(f"{a}/admin/keys/{created['id']}", headers=AUTH).status_code == 200
    assert seconds_until(lambda: ask(b, created["key"])[0] == "revoked_api_key", 1.0) <= 1.0


def test_rotated_on_b_the_old_secret_works_on_a_until_its_grace_ends(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    created = create(a)
    assert ask(a, created["key"])[0] is None
    rotated = httpx.post(
        f"{b}/admin/keys/{created['id']}/rotate", json={"grace_s": 3}, headers=AUTH
    )
    assert rotated.status_code == 200
    ends = time.monotonic() + 3
    new = rotated.json()["key"]
    seconds_until(lambda: ask(a, new)[0] is None, 1.0)
    assert ask(a, created["key"])[0] is None  # within the grace
    seconds_until(lambda: ask(a, created["key"])[0] == "revoked_api_key", 5.0)
    assert time.monotonic() >= ends - 0.5  # not before the grace ended (clocks: 0.5 s slack)
    assert ask(b, new)[0] is None


def test_an_expired_key_is_refused_on_both(replicas: tuple[str, str]) -> None:
    a, b = replicas
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    created = create(a, expires_at=soon)
    seconds_until(lambda: ask(a, created["key"])[0] == "expired_api_key", 5.0)
    assert ask(b, created["key"])[0] == "expired_api_key"


def test_a_keys_own_limit_and_its_usage_are_shared(replicas: tuple[str, str]) -> None:
    a, b = replicas
    created = create(b, limits={"requests": "4/minute"})
    started = time.monotonic()
    answers = [ask(a if i % 2 else b, created["key"], max_tokens=2 + i) for i in range(6)]
    refills = int((time.monotonic() - started) // 15)  # 4/minute: one every 15 s
    served = [usage for error, usage in answers if error is None]
    assert 4 <= len(served) <= 4 + refills
    assert [error for error, _ in answers[len(served) :]] == ["rate_limit_exceeded"] * (
        6 - len(served)
    )
    for url in (a, b):
        found = httpx.get(f"{url}/admin/usage", params={"key": created["id"]}, headers=AUTH)
        (row,) = found.json()["data"]
        assert row["requests_admitted"] == len(served)
        assert row["requests_rejected"] == 6 - len(served)
        assert row["prompt_tokens"] == sum(u.prompt_tokens for u in served)
        assert row["completion_tokens"] == sum(u.completion_tokens for u in served)

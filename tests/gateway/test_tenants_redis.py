"""Two gateway replicas on one real Redis, each with its own storage client and key table, the
`openai` SDK as the client: a key created on A works on B at once; revoked on A, B refuses it
within a second; rotated on B with a grace, the old secret works on A until the grace ends; a
key's own limits hold on both, counted once."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import quotagate as qg
from helpers import config_from, in_process
from quotagate.gateway.app import create_app
from support import RedisServer

pytestmark = pytest.mark.redis

ADMIN = "adm-replicas-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONFIG = f"""
[admin]
key_sha256 = ["{hashlib.sha256(ADMIN.encode()).hexdigest()}"]

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
"""


class Replica:
    def __init__(self, client: httpx.AsyncClient, app: Any) -> None:
        self.client = client
        self.app = app

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gateway.test/v1", api_key=key, http_client=self.client, max_retries=0
        )

    async def complete(self, key: str) -> int:
        try:
            await self.sdk(key).completions.create(
                model="quotagate-mock", prompt="hi", max_tokens=1
            )
        except openai.APIStatusError as exc:
            return exc.status_code
        return 200

    async def code(self, key: str) -> str | None:
        try:
            await self.sdk(key).completions.create(
                model="quotagate-mock", prompt="hi", max_tokens=1
            )
        except openai.APIStatusError as exc:
            return exc.code
        return None


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> AsyncIterator[tuple[Replica, Replica, qg.FakeClock]]:
    clock = qg.FakeClock(1_800_000_000.0)
    async with AsyncExitStack() as stack:
        made = []
        for name in ("a", "b"):
            storage = qg.RedisStorage(redis_server.url, prefix=key_prefix, timeout=2.0)
            app = create_app(config_from(tmp_path, CONFIG, f"{name}.toml"), storage=storage)
            client = await stack.enter_async_context(in_process(app))
            app.state.gateway.tenants.clock = clock
            made.append(Replica(client, app))
        yield made[0], made[1], clock


async def create(replica: Replica, **body: Any) -> dict[str, Any]:
    answer = await replica.client.post("/admin/keys", json={"tier": "pro", **body}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert isinstance(created, dict)
    return created


async def seconds_until(condition: Any, within: float) -> float:
    """How long ``await condition()`` took to come true, polled every 20 ms, up to ``within``."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_created_on_a_works_on_b_at_once(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, _ = replicas
    created = await create(a)
    assert await b.complete(created["key"]) == 200  # no wait: B asks the store


async def test_revoked_on_a_is_refused_by_b_within_a_second(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, _ = replicas
    created = await create(a)
    assert await b.complete(created["key"]) == 200
    assert (await a.client.delete(f"/admin/keys/{created['id']}", headers=AUTH)).status_code == 200

    async def refused() -> bool:
        return await b.code(created["key"]) == "revoked_api_key"

    assert await seconds_until(refused, within=1.0) <= 1.0


async def test_rotated_on_b_the_old_secret_works_on_a_until_the_grace_ends(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, clock = replicas
    created = await create(a)
    assert await a.complete(created["key"]) == 200
    rotated = await b.client.post(
        f"/admin/keys/{created['id']}/rotate", json={"grace_s": 60}, headers=AUTH
    )
    assert rotated.status_code == 200

    async def a_knows_the_new_secret() -> bool:
        return await a.complete(rotated.json()["key"]) == 200

    await seconds_until(a_knows_the_new_secret, within=1.0)
    assert await a.complete(created["key"]) == 200  # within the grace
    clock.advance(60)
    assert await a.code(created["key"]) == "revoked_api_key"
    assert await b.code(created["key"]) == "revoked_api_key"


async def test_a_keys_own_limit_holds_across_both_counted_once(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, _ = replicas
    created = await create(a, limits={"requests": "4/minute"})
    started = time.monotonic()
    statuses = [await (a if i % 2 else b).complete(created["key"]) for i in range(6)]
    refills = int((time.monotonic() - started) // 15)  # Redis's clock: one every 15 s
    assert 4 <= statuses.count(200) <= 4 + refills
    assert statuses[:4] == [200] * 4
    assert set(statuses[4:]) <= {200, 429}


async def test_usage_summed_across_both_is_what_the_answers_said(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, _ = replicas
    created = await create(a)
    said = [0, 0]
    for i in range(5):
        answer = (
            await (a if i % 2 else b)
            .sdk(created["key"])
            .completions.create(model="quotagate-mock", prompt="hello " * i, max_tokens=3 + i)
        )
        assert answer.usage is not None
        said[0] += answer.usage.prompt_tokens
        said[1] += answer.usage.completion_tokens
    for replica in (a, b):
        found = await replica.client.get(
            "/admin/usage", params={"key": created["id"]}, headers=AUTH
        )
        (row,) = found.json()["data"]
        assert (row["requests_admitted"], row["prompt_tokens"], row["completion_tokens"]) == (
            5,
            *said,
        )


async def test_with_redis_down_known_keys_serve_and_the_admin_api_says_503(
    tmp_path: Path, key_prefix: str
) -> None:
    with RedisServer() as server:
        storage = qg.storage_from_url(server.url + f"?prefix={key_prefix}&timeout_ms=300")
        app = create_app(config_from(tmp_path, CONFIG), storage=storage)
        async with in_process(app) as client:
            replica = Replica(client, app)
            created = await create(replica)
            assert await replica.complete(created["key"]) == 200
            server.stop()
            served = await replica.complete(created["key"])  # from the table, limited in memory
            unknown = await replica.code("sk-never-issued-0000")
            refused = await client.post("/admin/keys", json={"tier": "pro"}, headers=AUTH)
    assert served == 200
    assert unknown == "invalid_api_key"  # refused, not a 500
    assert refused.status_code == 503
    assert refused.json()["error"] == "storage_unavailable"
    assert refused.headers["retry-after"] == "1"


async def test_changes_of_one_key_at_once_are_applied_whole_or_refused(
    replicas: tuple[Replica, Replica, qg.FakeClock],
) -> None:
    a, b, _ = replicas
    created = await create(a)
    path = f"/admin/keys/{created['id']}"
    changes: list[dict[str, Any]] = [
        {"name": "renamed"},
        {"models": ["quotagate-mock"]},
        {"limits": {"requests": "7/minute"}},
        {"expires_at": "2030-01-01T00:00:00Z"},
    ]
    answers = await asyncio.gather(
        *(
            (a if i % 2 else b).client.patch(path, json=change, headers=AUTH)
            for i, change in enumerate(changes)
        )
    )
    final = (await a.client.get(path, headers=AUTH)).json()
    assert {answer.status_code for answer in answers} <= {200, 409}
    for change, answer in zip(changes, answers, strict=True):
        if answer.status_code == 409:
            assert answer.json()["error"] == "conflict"
            continue
        # A change that was answered 200 is in the key: none lost to another's stale read.
        ((field, value),) = change.items()
        expected = "2030-01-01T00:00:00Z" if field == "expires_at" else value
        assert final[field] == expected, (change, final)

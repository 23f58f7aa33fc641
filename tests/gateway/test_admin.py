"""The admin API: keys created, listed, changed, revoked and rotated at run time, in process on
memory storage with a fake clock (expiry and rotation grace are exact), and hostile input
answered with a precise 4xx that stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import quotagate as qg
from helpers import (
    NATURAL_LENGTH,
    RecordingUpstream,
    completion_prompt,
    config_from,
    error_code,
    gateway_app,
    in_process,
    stream_then_disconnect,
)
from quotagate.errors import ConfigError
from quotagate.gateway.app import Gateway
from quotagate.gateway.backends.mock import MockBackend
from quotagate.gateway.config import load_config
from quotagate.testing import async_wait_until

ADMIN = "adm-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONFIG_KEY = "sk-config-0001"
CONFIG = f"""
[admin]
key_sha256 = ["{hashlib.sha256(ADMIN.encode()).hexdigest()}"]

[tiers.free]
requests = "3/minute"
tokens = "100000/minute"

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
concurrency = 4

[[keys]]
key = "{CONFIG_KEY}"
tier = "free"
name = "from-the-file"
"""


@pytest.fixture
def clock() -> qg.FakeClock:
    return qg.FakeClock(1_800_000_000.0)


@pytest.fixture
async def client(tmp_path: Path, clock: qg.FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway_app(config_from(tmp_path, CONFIG), clock=clock)
    async with in_process(app) as c:
        gateway: Gateway = app.state.gateway
        assert gateway.tenants is not None
        gateway.tenants.clock = clock
        yield c


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer = await client.post("/admin/keys", json={"tier": "pro", **body}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert isinstance(created, dict)
    return created


async def complete(
    client: httpx.AsyncClient, key: str, model: str = "quotagate-mock"
) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 1}
    return await client.post("/v1/completions", json=body, headers={"X-API-Key": key})


async def test_without_an_admin_table_every_admin_path_is_404(tmp_path: Path) -> None:
    config = config_from(tmp_path, CONFIG[CONFIG.index("[tiers.free]") :])
    assert config.admin is None
    async with in_process(gateway_app(config)) as c:
        answers = [
            await c.get("/admin/keys", headers=AUTH),
            await c.post("/admin/keys", json={"tier": "free"}, headers=AUTH),
            await c.delete("/admin/keys/key_0123456789abcdef", headers=AUTH),
        ]
        schema = (await c.get("/openapi.json")).json()
    assert [a.status_code for a in answers] == [404, 404, 404]
    assert not any(path.startswith("/admin") for path in schema["paths"])


async def test_created_key_is_shown_once_and_works_at_once(client: httpx.AsyncClient) -> None:
    created = await create(client, name="acme", expires_at="2027-06-01T00:00:00Z")
    secret = created.pop("key")
    assert secret.startswith("sk-")
    assert created["id"].startswith("key_")
    assert created["masked"] == f"sk-…{secret[-4:]}"
    assert (created["tier"], created["name"], created["source"]) == ("pro", "acme", "api")
    assert created["expires_at"] == "2027-06-01T00:00:00Z"
    assert created["created_at"] == "2027-01-15T08:00:00Z"  # the fake clock's now
    assert (await complete(client, secret)).status_code == 200

    listed = (await client.get("/admin/keys", headers=AUTH)).json()["data"]
    shown = (await client.get(f"/admin/keys/{created['id']}", headers=AUTH)).json()
    for row in [*listed, shown]:
        assert "key" not in row
        assert secret not in str(row)
    assert [row["source"] for row in listed] == ["config", "api"]
    assert listed[0]["name"] == "from-the-file"
    assert shown == {**created, "last_used_at": None}  # written every 10 s, not per request


async def test_wrong_or_missing_admin_key_is_401_and_ten_failures_a_minute_are_429(
    client: httpx.AsyncClient, clock: qg.FakeClock
) -> None:
    missing = await client.get("/admin/keys")
    wrong = [
        await client.get("/admin/keys", headers={"Authorization": "Bearer nope"}) for _ in range(9)
    ]
    eleventh = await client.get("/admin/keys", headers=AUTH)  # the address is locked out
    assert missing.status_code == 401
    assert missing.json()["error"] == "invalid_admin_key"
    assert [w.status_code for w in wrong] == [401] * 9
    assert eleventh.status_code == 429
    assert eleventh.headers["retry-after"] == "6"  # 10/minute: one failure forgotten every 6 s
    clock.advance(6)
    assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200


async def test_an_admin_key_from_the_environment(tmp_path: Path) -> None:
    text = CONFIG.replace(
        f'key_sha256 = ["{hashlib.sha256(ADMIN.encode()).hexdigest()}"]', 'key_env = "ADMIN_KEY"'
    )
    path = tmp_path / "gateway.toml"
    path.write_text(text, "utf-8")
    with pytest.raises(ConfigError, match=r"admin\.key_env: the variable ADMIN_KEY is not set"):
        load_config(path, environ={})
    config = load_config(path, environ={"ADMIN_KEY": ADMIN})
    async with in_process(gateway_app(config)) as c:
        assert (await c.get("/admin/keys", headers=AUTH)).status_code == 200


async def test_revoked_key_is_refused_and_stays_listed(client: httpx.AsyncClient) -> None:
    created = await create(client)
    revoked = await client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
    refused = await complete(client, created["key"])
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] == "2027-01-15T08:00:00Z"
    assert refused.status_code == 401
    assert error_code(refused.json()) == "revoked_api_key"
    assert refused.headers["x-should-retry"] == "false"


async def test_an_expired_key_is_refused(client: httpx.AsyncClient, clock: qg.FakeClock) -> None:
    created = await create(client, expires_at="2027-01-15T09:00:00Z")
    assert (await complete(client, created["key"])).status_code == 200
    clock.advance(3600)
    refused = await complete(client, created["key"])
    assert refused.status_code == 401
    assert error_code(refused.json()) == "expired_api_key"


async def test_rotation_keeps_the_old_secret_for_the_grace_and_the_counters(
    client: httpx.AsyncClient, clock: qg.FakeClock
) -> None:
    created = await create(client, limits={"requests": "3/minute"})
    old = created["key"]
    assert (await complete(client, old)).status_code == 200
    rotated = await client.post(
        f"/admin/keys/{created['id']}/rotate", json={"grace_s": 30}, headers=AUTH
    )
    assert rotated.status_code == 200
    new = rotated.json()["key"]
    assert (rotated.json()["id"], new != old) == (created["id"], True)
    during = [await complete(client, old), await complete(client, new)]
    over = await complete(client, new)  # 3 of 3 used, across both secrets: one counter
    clock.advance(30)
    after = await complete(client, old)
    assert [a.status_code for a in during] == [200, 200]
    assert over.status_code == 429
    assert after.status_code == 401
    assert error_code(after.json()) == "revoked_api_key"


async def test_rotation_without_grace_ends_the_old_secret_at_once(
    client: httpx.AsyncClient,
) -> None:
    created = await create(client)
    rotated = await client.post(f"/admin/keys/{created['id']}/rotate", headers=AUTH)
    assert rotated.status_code == 200
    assert error_code((await complete(client, created["key"])).json()) == "revoked_api_key"
    assert (await complete(client, rotated.json()["key"])).status_code == 200


async def test_a_keys_own_limits_and_models_apply(client: httpx.AsyncClient) -> None:
    created = await create(client, limits={"requests": "1/minute"}, models=["quotagate-mock"])
    first = await complete(client, created["key"])
    second = await complete(client, created["key"])
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert second.status_code == 429
    other = await create(client, models=["llama-3-70b"])
    refused = await complete(client, other["key"])
    assert refused.status_code == 403
    assert error_code(refused.json()) == "model_not_allowed"
    assert refused.json()["error"]["param"] == "model"


async def test_a_change_applies_at_once_and_keeps_the_counters(client: httpx.AsyncClient) -> None:
    created = await create(client, limits={"requests": "2/minute"})
    used = [await complete(client, created["key"]) for _ in range(2)]
    changed = await client.patch(
        f"/admin/keys/{created['id']}",
        json={"name": "renamed", "limits": {"requests": "3/minute"}},
        headers=AUTH,
    )
    after = [await complete(client, created["key"]) for _ in range(2)]
    assert [u.status_code for u in used] == [200, 200]
    assert changed.status_code == 200
    assert (changed.json()["name"], changed.json()["limits"]) == (
        "renamed",
        {"requests": "3/minute"},
    )
    assert [a.status_code for a in after] == [200, 429]  # 2 used of 3: one more


@pytest.mark.parametrize(
    ("body", "status", "code", "names"),
    [
        ({"tier": "gold"}, 400, "invalid_request", "tier: unknown tier"),
        ({"tier": "pro", "colour": "red"}, 400, "invalid_request", "colour: unknown field"),
        ({"tier": "pro", "limits": {"requests": "lots"}}, 400, "invalid_request", "requests"),
        ({"tier": "pro", "limits": {"concurrency": 0}}, 400, "invalid_request", "concurrency"),
        ({"tier": "pro", "expires_at": "soon"}, 400, "invalid_request", "expires_at"),
        ({"name": "no tier"}, 400, "invalid_request", "tier: required field missing"),
        (["a", "list"], 400, "invalid_json", "object"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field_and_store_nothing(
    client: httpx.AsyncClient, body: Any, status: int, code: str, names: str
) -> None:
    answer = await client.post("/admin/keys", json=body, headers=AUTH)
    listed = (await client.get("/admin/keys", headers=AUTH)).json()["data"]
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == code
    assert names in answer.json()["message"]
    assert [row["source"] for row in listed] == ["config"]


async def test_malformed_and_huge_bodies(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    broken = await client.post("/admin/keys", content=b'{"tier": ', headers=headers)
    huge = await client.post("/admin/keys", content=b"{" + b" " * 100_000 + b"}", headers=headers)
    assert (broken.status_code, broken.json()["error"]) == (400, "invalid_json")
    assert (huge.status_code, huge.json()["error"]) == (413, "body_too_large")


@pytest.mark.parametrize(
    "key_id",
    [
        "key_0123456789abcdef",
        "nothing",
        "key_' OR 1=1 --",
        "..%2F..%2Fetc%2Fpasswd",
        "key_" + "f" * 90,
    ],
)
async def test_ids_that_do_not_exist_are_404(client: httpx.AsyncClient, key_id: str) -> None:
    answers = [
        await client.get(f"/admin/keys/{key_id}", headers=AUTH),
        await client.patch(f"/admin/keys/{key_id}", json={"name": "x"}, headers=AUTH),
        await client.delete(f"/admin/keys/{key_id}", headers=AUTH),
        await client.post(f"/admin/keys/{key_id}/rotate", headers=AUTH),
    ]
    assert [a.status_code for a in answers] == [404] * 4
    # A path-like id is no route (the slashes are decoded): the router's 404, as flat.
    expected = "not_found" if "%2F" in key_id else "key_not_found"
    assert {a.json()["error"] for a in answers} == {expected}


async def test_config_keys_are_listed_and_read_only(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/admin/keys", headers=AUTH)).json()["data"]
    (row,) = listed
    assert (row["source"], row["tier"], row["masked"]) == ("config", "free", "sk-…0001")
    changes = [
        await client.patch(f"/admin/keys/{row['id']}", json={"tier": "pro"}, headers=AUTH),
        await client.delete(f"/admin/keys/{row['id']}", headers=AUTH),
        await client.post(f"/admin/keys/{row['id']}/rotate", headers=AUTH),
    ]
    assert [c.status_code for c in changes] == [409] * 3
    assert (await complete(client, CONFIG_KEY)).status_code == 200  # unchanged


async def usage(client: httpx.AsyncClient, **query: str) -> dict[str, Any]:
    answer = await client.get("/admin/usage", params=query, headers=AUTH)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body, dict)
    return body


async def test_usage_sums_to_what_the_answers_said(client: httpx.AsyncClient) -> None:
    created = await create(client, limits={"requests": "3/minute"})
    headers = {"X-API-Key": created["key"]}
    said = {"prompt_tokens": 0, "completion_tokens": 0}
    plain = await client.post(
        "/v1/completions",
        json={"model": "quotagate-mock", "prompt": "hello there", "max_tokens": 5},
        headers=headers,
    )
    stream = await client.post(
        "/v1/chat/completions",
        json={
            "model": "quotagate-mock",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=headers,
    )
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: {")]
    for answer_usage in (plain.json()["usage"], json.loads(events[-1])["usage"]):
        for name in said:
            said[name] += answer_usage[name]
    other = await complete(client, created["key"], model="other-model")
    over = await complete(client, created["key"])
    anonymous = await complete(client, "")
    by_day = await usage(client, key=created["id"])
    by_model = await usage(client, key=created["id"], group_by="model")
    by_key = await usage(client, group_by="key")
    assert (plain.status_code, stream.status_code, other.status_code) == (200, 200, 200)
    assert over.status_code == 429
    assert anonymous.status_code == 401  # no [anonymous]: refused before any limit
    (day,) = by_day["data"]
    assert day["day"] == by_day["from"] == by_day["to"] == "2027-01-15"
    assert (day["requests_admitted"], day["requests_rejected"]) == (3, 1)
    other_usage = other.json()["usage"]
    assert day["prompt_tokens"] == said["prompt_tokens"] + other_usage["prompt_tokens"]
    assert day["completion_tokens"] == said["completion_tokens"] + other_usage["completion_tokens"]
    assert [(r["model"], r["requests_admitted"]) for r in by_model["data"]] == [
        ("other-model", 1),
        ("quotagate-mock", 2),
    ]
    assert [r["key"] for r in by_key["data"]] == [created["id"]]


async def test_usage_query_mistakes_are_400_and_unknown_keys_404(
    client: httpx.AsyncClient,
) -> None:
    answers = {
        "from": await client.get("/admin/usage?from=yesterday", headers=AUTH),
        "group_by": await client.get("/admin/usage?group_by=hour", headers=AUTH),
        "colour": await client.get("/admin/usage?colour=red", headers=AUTH),
    }
    backwards = await client.get("/admin/usage?from=2027-01-10&to=2027-01-01", headers=AUTH)
    unknown = await client.get("/admin/usage?key=key_0123456789abcdef", headers=AUTH)
    for name, answer in answers.items():
        assert answer.status_code == 400, answer.text
        assert answer.json()["message"].startswith(name), answer.text
    assert backwards.json()["message"] == "from: after to (got 2027-01-10 > 2027-01-01)"
    assert (unknown.status_code, unknown.json()["error"]) == (404, "key_not_found")


async def test_last_use_is_written_and_the_api_is_in_the_docs(
    client: httpx.AsyncClient, clock: qg.FakeClock
) -> None:
    created = await create(client)
    assert (await complete(client, created["key"])).status_code == 200
    clock.advance(10)  # the replica writes last uses every 10 s, on its next refresh

    async def shown() -> Any:
        row = (await client.get(f"/admin/keys/{created['id']}", headers=AUTH)).json()
        return row["last_used_at"]

    for _ in range(100):  # refreshes every 0.25 s: a few at most
        if await shown() is not None:
            break
        await asyncio.sleep(0.05)
    assert await shown() == "2027-01-15T08:00:00Z"  # when it was used, not when written
    schema = (await client.get("/openapi.json")).json()
    admin_paths = {path for path, ops in schema["paths"].items() if path.startswith("/admin")}
    assert admin_paths == {
        "/admin/keys",
        "/admin/keys/{key_id}",
        "/admin/keys/{key_id}/rotate",
        "/admin/usage",
    }
    assert all(
        op["tags"] == ["admin"] for path in admin_paths for op in schema["paths"][path].values()
    )


async def test_a_client_gone_mid_stream_is_counted_with_what_was_generated(
    tmp_path: Path, clock: qg.FakeClock
) -> None:
    app = gateway_app(
        config_from(tmp_path, CONFIG), clock=clock, backend=MockBackend(tokens_per_second=50)
    )
    async with in_process(app) as c:
        app.state.gateway.tenants.clock = clock
        created = await create(c)
        body = {"prompt": "Once upon", "max_tokens": 100, "stream": True}
        received = await stream_then_disconnect(app, "/v1/completions", body, created["key"], 4)

        async def counted() -> bool:
            rows = (await usage(c, key=created["id"]))["data"]
            return bool(rows) and rows[0]["requests_admitted"] == 1

        await async_wait_until(counted, 10, "the stream counted")
        (row,) = (await usage(c, key=created["id"]))["data"]
    assert b"[DONE]" not in b"".join(received)  # it left mid-stream
    assert row["prompt_tokens"] == completion_prompt("Once upon")
    assert 4 <= row["completion_tokens"] < NATURAL_LENGTH  # what was generated, not 100
    assert row["requests_rejected"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_model_server_failed_counts_nothing(
    tmp_path: Path, clock: qg.FakeClock, stream: bool
) -> None:
    async def failing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "CUDA out of memory"}})

    backend = RecordingUpstream(failing).backend()
    app = gateway_app(config_from(tmp_path, CONFIG), clock=clock, backend=backend)
    async with in_process(app) as c:
        app.state.gateway.tenants.clock = clock
        created = await create(c)
        body = {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": stream}
        failed = await c.post("/v1/completions", json=body, headers={"X-API-Key": created["key"]})
        rows = (await usage(c, key=created["id"]))["data"]
    assert failed.status_code == 502
    assert rows == []  # refunded: not admitted, and not rejected by a limit either


async def test_the_admin_key_is_never_a_client_key(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    refused = await complete(client, ADMIN)
    assert refused.status_code == 401
    assert error_code(refused.json()) == "invalid_api_key"
    both = CONFIG + f'\n[[keys]]\nkey = "{ADMIN}"\ntier = "pro"\n'
    with pytest.raises(ConfigError, match=r"keys\[1\]: the admin key cannot also be a client key"):
        config_from(tmp_path, both, "both.toml")


async def test_a_keys_own_weight_is_its_share_of_the_queue(client: httpx.AsyncClient) -> None:
    heavy = await create(client, limits={"weight": 3})
    plain = await create(client)
    bad = await client.post(
        "/admin/keys", json={"tier": "pro", "limits": {"weight": 0}}, headers=AUTH
    )
    assert bad.status_code == 400
    gateway: Gateway = client._transport.app.state.gateway  # type: ignore[attr-defined]
    weights = []
    for key in (heavy["key"], plain["key"]):
        scope = {"type": "http", "headers": [(b"x-api-key", key.encode())], "client": None}
        caller = await gateway.callers.identify_issued(scope)
        weights.append(caller.tier.weight)  # type: ignore[union-attr]
    assert weights == [3, 1]

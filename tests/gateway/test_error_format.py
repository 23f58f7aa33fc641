"""Every error of the gateway is in OpenAI's shape, ``{"error": {"message", "type", "code",
"param", ...}}``, which OpenAI's SDKs read into their exceptions; ``[server] error_format =
"tutorial"`` gives the seed tutorial's flat body with the same code, message and fields."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ALICE, BOB, base_config, gateway_app, in_process
from quotagate.errors import ConfigError

Ask = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def _over_the_limit(client: httpx.AsyncClient) -> httpx.Response:
    for _ in range(3):  # free: 3/minute
        ok = await client.post("/v1/completions", json={"prompt": "hi"}, headers=_key(ALICE))
        assert ok.status_code == 200, ok.text
    return await client.post("/v1/completions", json={"prompt": "hi"}, headers=_key(ALICE))


def _key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _post(body: Any, key: str = BOB, **kwargs: Any) -> Ask:
    async def ask(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/completions", json=body, headers=_key(key), **kwargs)

    return ask


async def _malformed(client: httpx.AsyncClient) -> httpx.Response:
    headers = {**_key(BOB), "content-type": "application/json"}
    return await client.post("/v1/completions", content=b"{", headers=headers)


async def _too_big_body(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/completions", json={"prompt": "x" * 5000}, headers=_key(BOB))


async def _unknown_path(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/v1/nothing-here")


async def _wrong_method(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/v1/completions")


#: (what, request, status, code, type, param, extra fields)
CASES: list[tuple[str, Ask, int, str, str, str | None, set[str]]] = [
    ("malformed", _malformed, 400, "invalid_json", "invalid_request_error", None, set()),
    (
        "bad-field",
        _post({"prompt": "hi", "max_tokens": "many"}),
        400,
        "invalid_request",
        "invalid_request_error",
        "max_tokens",
        set(),
    ),
    (
        "unknown-key",
        _post({"prompt": "hi"}, key="sk-nobody-9999"),
        401,
        "invalid_api_key",
        "invalid_request_error",
        None,
        set(),
    ),
    ("path", _unknown_path, 404, "not_found", "invalid_request_error", None, set()),
    ("method", _wrong_method, 405, "method_not_allowed", "invalid_request_error", None, set()),
    ("body", _too_big_body, 413, "body_too_large", "invalid_request_error", None, set()),
    (
        "limited",
        _over_the_limit,
        429,
        "rate_limit_exceeded",
        "requests",
        None,
        {"retry_after", "limit"},
    ),
    (
        "too-large",
        _post({"prompt": "hi", "max_tokens": 5000}, key=ALICE),  # free: 600 tokens/minute
        429,
        "request_too_large",
        "invalid_request_error",
        None,
        {"limit"},
    ),
]


async def _answer(tmp_path: Path, fmt: str, ask: Ask) -> httpx.Response:
    server = f'[server]\nmax_body_bytes = 4096\nerror_format = "{fmt}"\n'
    config = base_config(tmp_path, extra=server)
    assert config.server.error_format == fmt
    async with in_process(gateway_app(config)) as client:
        return await ask(client)


@pytest.mark.parametrize(
    ("ask", "status", "code", "kind", "param", "extra"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_each_error_is_openai_shaped_and_the_tutorial_format_is_flat(
    tmp_path: Path,
    ask: Ask,
    status: int,
    code: str,
    kind: str,
    param: str | None,
    extra: set[str],
) -> None:
    openai = await _answer(tmp_path, "openai", ask)
    tutorial = await _answer(tmp_path, "tutorial", ask)
    for answer in (openai, tutorial):
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert int(answer.headers["content-length"]) == len(answer.content)

    body = openai.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"} | extra
    assert (error["type"], error["code"], error["param"]) == (kind, code, param)
    assert isinstance(error["message"], str)
    assert error["message"]

    flat = tutorial.json()
    expected = {"error": code, "message": error["message"]}
    expected |= {name: error[name] for name in extra}
    if param is not None:
        expected["param"] = param
    assert flat == expected
    assert tutorial.headers.get("x-should-retry") == openai.headers.get("x-should-retry")


async def test_the_default_is_openai_and_anything_else_is_a_config_error(tmp_path: Path) -> None:
    assert base_config(tmp_path).server.error_format == "openai"
    with pytest.raises(ConfigError, match=r"server\.error_format"):
        base_config(tmp_path, extra='[server]\nerror_format = "flat"\n')

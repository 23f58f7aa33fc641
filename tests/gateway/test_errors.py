"""Bad requests get precise answers: malformed JSON -> 400, a missing or invalid field ->
400/422 naming it, a body over ``max_body_bytes`` -> 413. Never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import (
    BOB,
    RecordingUpstream,
    base_config,
    config_from,
    error_code,
    error_of,
    gateway_app,
    in_process,
    limits_of,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ERROR_STATUSES = {400, 413, 422, 429}


def _backend(kind: str) -> Any:
    return RecordingUpstream().backend() if kind == "openai" else None


def _assert_json_error(response: httpx.Response, statuses: set[int]) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict)
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b"", b'{"prompt": "hi",}', b"{'prompt': 'hi'}", b"\xff\xfe"],
    ids=["open-brace", "words", "empty", "trailing-comma", "single-quotes", "bytes"],
)
async def test_malformed_json_is_400(tmp_path: Path, raw: bytes) -> None:
    async with in_process(gateway_app(base_config(tmp_path)), raise_app_exceptions=False) as c:
        response = await c.post(
            COMPLETIONS, content=raw, headers={"X-API-Key": BOB, "content-type": "application/json"}
        )
    body = _assert_json_error(response, {400})
    assert error_code(body)


@pytest.mark.parametrize("backend", ["mock", "openai"])
@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "top_p": Infinity}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
    ],
    ids=["NaN", "Infinity", "-Infinity"],
)
async def test_non_standard_json_numbers_are_malformed_json(
    tmp_path: Path, raw: bytes, backend: str
) -> None:
    """NaN and Infinity are not JSON (RFC 8259): a 400, never a 500 when forwarding them."""
    path = CHAT if b"messages" in raw else COMPLETIONS
    app = gateway_app(base_config(tmp_path), backend=_backend(backend))
    async with in_process(app, raise_app_exceptions=False) as c:
        response = await c.post(
            path, content=raw, headers={"X-API-Key": BOB, "content-type": "application/json"}
        )
    _assert_json_error(response, {400})


@pytest.mark.parametrize("backend", ["mock", "openai"])
@pytest.mark.parametrize(
    ("path", "raw"),
    [
        (COMPLETIONS, b'{"prompt": "hi", "model": "\\ud800"}'),
        (COMPLETIONS, b'{"prompt": "\\udfff"}'),
        (CHAT, b'{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}'),
        (COMPLETIONS, b'{"prompt": "hi", "stream": true, "model": "\\ud800"}'),
    ],
    ids=["model", "prompt", "name", "stream-model"],
)
async def test_a_lone_surrogate_escape_is_never_a_500(
    tmp_path: Path, path: str, raw: bytes, backend: str
) -> None:
    app = gateway_app(base_config(tmp_path), backend=_backend(backend))
    async with in_process(app, raise_app_exceptions=False) as c:
        response = await c.post(
            path, content=raw, headers={"X-API-Key": BOB, "content-type": "application/json"}
        )
    assert response.status_code in {200, 400, 422}, (response.status_code, response.text)
    if response.status_code != 200:
        _assert_json_error(response, {400, 422})


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (CHAT, {"model": "quotagate-mock"}, "messages"),
        (CHAT, {"messages": "hello"}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": ["hello"]}, "messages[0]"),
        (CHAT, {"messages": [{"content": "hello"}]}, "role"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "content"),
        (COMPLETIONS, {"model": "quotagate-mock"}, "prompt"),
        (COMPLETIONS, {"prompt": 42}, "prompt"),
        (COMPLETIONS, {"prompt": {"text": "hi"}}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [1, 2.5]}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": True},
            "max_completion_tokens",
        ),
        (COMPLETIONS, {"prompt": "hi", "n": 0}, "n"),
        (COMPLETIONS, {"prompt": "hi", "n": "2"}, "n"),
        (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, "stream"),
        (
            COMPLETIONS,
            {"prompt": "hi", "stream": True, "stream_options": "usage"},
            "stream_options",
        ),
        (COMPLETIONS, {"prompt": "hi", "model": 5}, "model"),
    ],
)
async def test_a_missing_or_invalid_field_is_named(
    tmp_path: Path, path: str, body: dict[str, Any], field: str
) -> None:
    async with in_process(gateway_app(base_config(tmp_path)), raise_app_exceptions=False) as c:
        response = await c.post(path, json=body, headers={"X-API-Key": BOB})
    _assert_json_error(response, {400, 422})
    assert field in response.text


@pytest.mark.parametrize("backend", ["mock", "openai"])
async def test_whole_numbers_written_as_decimals_are_integers(tmp_path: Path, backend: str) -> None:
    """JSON Schema's ``integer`` (so the gateway's OpenAPI schema) admits ``37.0``: so does the
    gateway, and it counts it as 37. The client's bytes go upstream as they came."""
    upstream = RecordingUpstream() if backend == "openai" else None
    app = gateway_app(base_config(tmp_path), backend=upstream.backend() if upstream else None)
    async with in_process(app, raise_app_exceptions=False) as c:
        response = await c.post(
            COMPLETIONS,
            content=b'{"prompt": [1.0, 2.0, 3.0], "max_tokens": 7.0, "n": 2.0}',
            headers={"X-API-Key": BOB, "content-type": "application/json"},
        )
        limits = await limits_of(c, BOB)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 7 * 2)
    assert limits["tokens"]["limit"] - limits["tokens"]["remaining"] == 3 + 7 * 2
    if upstream is not None:
        assert upstream.bodies == [{"prompt": [1.0, 2.0, 3.0], "max_tokens": 7.0, "n": 2.0}]


@pytest.mark.parametrize("raw", [b"[]", b'"hello"', b"42", b"null"])
async def test_json_that_is_not_an_object_is_400(tmp_path: Path, raw: bytes) -> None:
    async with in_process(gateway_app(base_config(tmp_path)), raise_app_exceptions=False) as c:
        response = await c.post(
            COMPLETIONS, content=raw, headers={"X-API-Key": BOB, "content-type": "application/json"}
        )
    _assert_json_error(response, {400, 422})


SMALL_BODIES = "[server]\nmax_body_bytes = 1000\n"


def _body_of_size(size: int) -> bytes:
    head, tail = b'{"prompt": "', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


async def test_a_body_over_max_body_bytes_is_413(tmp_path: Path) -> None:
    app = gateway_app(base_config(tmp_path, extra=SMALL_BODIES))
    headers = {"X-API-Key": BOB, "content-type": "application/json"}
    async with in_process(app, raise_app_exceptions=False) as c:
        at_limit = await c.post(COMPLETIONS, content=_body_of_size(1000), headers=headers)
        over = await c.post(COMPLETIONS, content=_body_of_size(1001), headers=headers)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            body = _body_of_size(5000)
            for i in range(0, len(body), 700):
                yield body[i : i + 700]

        streamed = await c.post(COMPLETIONS, content=chunked(), headers=headers)
        state = await limits_of(c, BOB)
    assert at_limit.status_code == 200
    _assert_json_error(over, {413})
    _assert_json_error(streamed, {413})
    assert "content-length" not in streamed.request.headers
    assert state["requests"]["remaining"] == 99  # only the request at the limit counted


# -- never a 500 -------------------------------------------------------------------------------

FUZZ_CONFIG = """
[backend]
max_concurrency = 64

[anonymous]
tier = "fuzz"

[tiers.fuzz]
requests = "100000000/minute"
tokens = "1000000000/minute"
concurrency = 64
"""

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_message = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls"]),
    _json | st.sampled_from(["user", "assistant", "hello world"]),
    max_size=3,
)
_fields = {
    "model": _json | st.just("quotagate-mock"),
    "prompt": _json | st.lists(st.integers(0, 50_000), max_size=5) | st.text(max_size=40),
    "messages": _json | st.lists(_message | _json, max_size=3),
    "max_tokens": _json | st.integers(-3, 20_000_000),
    "max_completion_tokens": _json | st.integers(-3, 100),
    "n": _json | st.integers(-1, 200),
    "stream": _json | st.booleans(),
    "stream_options": _json | st.just({"include_usage": True}),
    "temperature": _json,
}
_options = {
    "max_tokens": st.integers(1, 60),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": False}, {}]),
    "model": st.text(max_size=10),
    "temperature": st.floats(0, 2),
    "user": _json,
}
_completion = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30) | st.lists(st.text(max_size=6), min_size=1, max_size=3)},
    optional=_options,
)
_chat = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"])},
                optional={
                    "content": st.text(max_size=30)
                    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _json})),
                    "name": st.text(max_size=6),
                },
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional=_options,
)
_requests = st.one_of(
    st.tuples(st.just(COMPLETIONS), _completion),
    st.tuples(st.just(CHAT), _chat),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS]), st.fixed_dictionaries({}, optional=_fields)),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS]), _json),
)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """One gateway (openai backend: bodies are re-serialized upstream) for every example."""
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    config = config_from(tmp_path_factory.mktemp("fuzz"), FUZZ_CONFIG)
    app = gateway_app(config, backend=RecordingUpstream().backend())
    client = loop.run_until_complete(
        stack.enter_async_context(in_process(app, raise_app_exceptions=False))
    )
    try:
        yield loop, client
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=_requests)
def test_no_json_body_gets_a_500(fuzz_client: tuple[Any, Any], request: tuple[str, Any]) -> None:
    loop, client = fuzz_client
    path, body = request
    response = loop.run_until_complete(
        client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    )
    event(f"status {response.status_code}")
    if isinstance(body, dict) and body.get("stream") is True:
        event(f"stream, status {response.status_code}")
    assert response.status_code in {200} | ERROR_STATUSES, (response.status_code, response.text)
    if response.status_code != 200:
        _assert_json_error(response, ERROR_STATUSES)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200))
def test_no_bytes_get_a_500(fuzz_client: tuple[Any, Any], raw: bytes) -> None:
    loop, client = fuzz_client
    response = loop.run_until_complete(client.post(COMPLETIONS, content=raw))
    assert response.status_code in {200} | ERROR_STATUSES, (response.status_code, response.text)


async def test_unknown_paths_and_methods_answer_in_the_gateway_error_shape(
    tmp_path: Path,
) -> None:
    async with in_process(gateway_app(base_config(tmp_path))) as c:
        missing = await c.get("/v1/nothing-here")
        wrong_method = await c.get(CHAT)
    body = _assert_json_error(missing, {404})
    assert error_code(body) == "not_found"
    assert "/v1/nothing-here" in error_of(body)["message"]
    body = _assert_json_error(wrong_method, {405})
    assert error_code(body) == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"

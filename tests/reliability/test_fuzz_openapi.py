"""Schemathesis fuzzes every gateway endpoint from the gateway's own ``/openapi.json``, against a
real ``quotagate serve`` process: valid-by-schema (positive) and invalid-by-schema (negative)
requests, with no key, a valid key or an unknown key. No 5xx, the process never dies, every
error is a JSON object with an ``error`` field, and no body the schema admits gets a 400."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_kit import KEY_PRO, Gateway, config_text
from schemathesis.generation.modes import GenerationMode

pytestmark = pytest.mark.reliability

#: Every endpoint the gateway documents (a test checks the schema lists exactly these).
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/ratelimit"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
EXAMPLES = {"POST": 400, "GET": 25}

TIERS = f"""
[tiers.open]
requests = "1000000/minute"
tokens = "1000000000/minute"
concurrency = 64
default_max_tokens = 16

[[keys]]
key = "{KEY_PRO}"
tier = "open"
"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = config_text(TIERS, anonymous="open", server="max_body_bytes = 1048576")
    gateway = Gateway(config, tmp_path_factory.mktemp("fuzz"))
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def schema(fuzzed: Gateway) -> Any:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


def test_the_schema_documents_every_endpoint(schema: Any) -> None:
    documented = {
        (result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()
    }
    assert documented == set(OPERATIONS)


def check_answer(response: Any, path: str) -> None:
    """``response``: schemathesis' Response (lower-case header names, lists of values)."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), (response.status_code, content_type)
        body = json.loads(response.content)
        assert isinstance(body, dict)
        assert isinstance(body.get("error", {}).get("code"), str), body  # OpenAI's shape
        assert "Traceback" not in response.text
    elif path.startswith("/v1/") and path.endswith("completions"):
        if content_type.startswith("text/event-stream"):
            if not response.stream_cut_short:
                assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert isinstance(json.loads(response.content), dict)


# Negative data needs something to break: the GET endpoints take no parameters or body.
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_endpoint_no_5xx_and_every_error_is_json(
    schema: Any,
    fuzzed: Gateway,
    method: str,
    path: str,
    mode: GenerationMode,
    figures: dict[str, Any],
) -> None:
    operation = schema[path][method]
    statuses: Counter[int] = Counter()
    rejected_valid: Counter[str] = Counter()  # 400s to bodies the schema calls valid
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names

    @settings(
        max_examples=EXAMPLES[method],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        key=st.sampled_from([None, KEY_PRO, "sk-unknown-key"]),
    )
    def fuzz(case: Any, key: str | None) -> None:
        headers = {"X-API-Key": key} if key else None
        response = case.call(base_url=fuzzed.url, session=session, headers=headers, timeout=10)
        statuses[response.status_code] += 1
        check_answer(response, path)
        if response.status_code == 400 and mode is GenerationMode.POSITIVE:
            rejected_valid[json.loads(response.content).get("message", "")[:60]] += 1

    try:
        fuzz()
    finally:
        session.close()
        figures.update(mode=str(mode), requests=sum(statuses.values()), statuses=dict(statuses))
        if rejected_valid:
            figures["schema_valid_but_400"] = dict(rejected_valid.most_common(5))
    assert fuzzed.process is not None
    assert fuzzed.process.poll() is None, "the gateway is still running"
    assert "Traceback" not in fuzzed.output()
    assert sum(statuses.values()) >= 1
    # The schema is the contract: a body it admits is not refused as invalid.
    assert not rejected_valid, rejected_valid

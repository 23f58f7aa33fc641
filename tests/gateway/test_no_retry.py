"""``x-should-retry: false`` on what waiting cannot fix, so the ``openai`` SDK (which obeys it)
raises at once instead of retrying: a request too large for its limit, an unknown key, a model
nobody serves. A plain 429 is still retried, as the SDK does by default."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from fleet_fakes import A, B, Replicas, app_of

from helpers import ALICE, base_config, gateway_app, metric_samples, sample

TOO_LARGE = "x " * 2000  # far more tokens than the free tier's whole 600/minute


def sdk(app: object, key: str) -> tuple[openai.AsyncOpenAI, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test")
    client = openai.AsyncOpenAI(
        base_url="http://gw.test/v1", api_key=key, http_client=http, max_retries=2
    )
    return client, http


async def requests_answered(http: httpx.AsyncClient, status: str) -> float:
    samples = metric_samples((await http.get("/metrics")).text)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "quotagate_requests_total" and ("status", status) in labels
    )


async def test_a_request_too_large_is_not_retried(tmp_path: Path) -> None:
    app = gateway_app(base_config(tmp_path))
    async with app.router.lifespan_context(app):
        client, http = sdk(app, ALICE)
        with pytest.raises(openai.RateLimitError) as raised:
            await client.completions.create(model="quotagate-mock", prompt=TOO_LARGE)
        assert raised.value.response.headers["x-should-retry"] == "false"
        assert await requests_answered(http, "429") == 1  # asked once, not three times
        await http.aclose()


async def test_an_unknown_key_is_not_retried(tmp_path: Path) -> None:
    app = gateway_app(base_config(tmp_path))
    async with app.router.lifespan_context(app):
        client, http = sdk(app, "sk-nobody")
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.completions.create(model="quotagate-mock", prompt="hi")
        assert raised.value.response.headers["x-should-retry"] == "false"
        samples = metric_samples((await http.get("/metrics")).text)
        assert (
            sample(
                samples, "quotagate_requests_total", tier="none", route="completions", status="401"
            )
            == 1
        )
        await http.aclose()


async def test_a_model_nobody_serves_is_not_retried(tmp_path: Path) -> None:
    app = app_of(tmp_path, Replicas(A, B))
    async with app.router.lifespan_context(app):
        client, http = sdk(app, ALICE)
        with pytest.raises(openai.NotFoundError) as raised:
            await client.completions.create(model="gpt-5", prompt="hi")
        assert raised.value.response.headers["x-should-retry"] == "false"
        assert await requests_answered(http, "404") == 1
        await http.aclose()


async def test_a_plain_rate_limit_may_be_retried(tmp_path: Path) -> None:
    """The header is only where waiting cannot help: an ordinary 429 has none."""
    app = gateway_app(base_config(tmp_path))
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test")
        statuses = []
        for _ in range(4):  # the free tier allows 3/minute
            response = await http.post(
                "/v1/completions", json={"prompt": "hi"}, headers={"X-API-Key": ALICE}
            )
            statuses.append((response.status_code, response.headers.get("x-should-retry")))
        await http.aclose()
    assert statuses == [(200, None)] * 3 + [(429, None)]

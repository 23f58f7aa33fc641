"""``server.cors_allow_origins``: a browser page calling the gateway directly gets its preflight
answered and can read the rate-limit headers, on admissions and on 429s alike. Off by default."""

from __future__ import annotations

from pathlib import Path

from helpers import ALICE, base_config, gateway_app, in_process

PAGE = "https://app.example"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}
BODY = {"prompt": "x", "max_tokens": 1}


async def test_an_allowed_page_gets_preflights_and_the_rate_limit_headers(tmp_path: Path) -> None:
    config = base_config(tmp_path, top=f'[server]\ncors_allow_origins = ["{PAGE}"]')
    async with in_process(gateway_app(config)) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        answers = [
            await client.post(
                "/v1/completions", json=BODY, headers={"Origin": PAGE, "X-API-Key": ALICE}
            )
            for _ in range(4)  # the free tier: 3/minute
        ]
        stranger = await client.post(
            "/v1/completions", json=BODY, headers={"Origin": "https://evil.example"}
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    for answer in answers:
        assert answer.headers["access-control-allow-origin"] == PAGE
        exposed = answer.headers["access-control-expose-headers"].split(",")
        for name in (
            "x-ratelimit-remaining-requests",
            "retry-after",
            "ratelimit",
            "retry-after-ms",
        ):
            assert name in [e.strip() for e in exposed], name
    assert "access-control-allow-origin" not in stranger.headers


async def test_off_by_default(tmp_path: Path) -> None:
    async with in_process(gateway_app(base_config(tmp_path))) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        answer = await client.post(
            "/v1/completions", json=BODY, headers={"Origin": PAGE, "X-API-Key": ALICE}
        )
    assert preflight.status_code == 405
    assert answer.status_code == 200
    assert "access-control-allow-origin" not in answer.headers

"""Soak: mixed load at ~70% of measured capacity across three tiers, on memory and on Redis,
for ``QUOTAGATE_SOAK_SECONDS`` (default 600) per storage, against a real gateway process.
Not part of the test command: ``pytest -m soak tests/reliability``.

The load is ``hey`` (one process per tier, each at a fixed rate, in windows of up to 60 s):
free-tier completions far over their 10/s limit (the intended 429s), pro completions and team
chat streams under theirs. Per window: requests, statuses, p50/p99 per tier, gateway RSS.
Pass: no error other than the free tier's 429s, RSS growth under 10% after the first window,
and the last window's p99 within twice the first's (plus 20 ms)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import (
    KEY_FREE,
    KEY_PRO,
    KEY_TEAM,
    Gateway,
    config_text,
    gateways,
    http_client,
    metrics_of,
    ratelimit_of,
)

from support import RedisServer

SOAK_SECONDS = int(os.environ.get("QUOTAGATE_SOAK_SECONDS", "600"))
WINDOW = max(10, min(60, SOAK_SECONDS // 5))
SHARE = {"free": 0.15, "pro": 0.55, "team": 0.30}  # of the target rate
WORKERS = 32  # hey workers per tier (each paced at its share of the rate)

TIERS = f"""
[tiers.free]
requests = "600/minute"
tokens = "1000000/minute"
concurrency = 16
default_max_tokens = 16

[tiers.pro]
requests = "10000000/minute"
tokens = "1000000000/minute"
concurrency = 256
default_max_tokens = 16

[tiers.team]
requests = "10000000/minute"
tokens = "1000000000/minute"
concurrency = 256
default_max_tokens = 16

[[keys]]
key = "{KEY_FREE}"
tier = "free"

[[keys]]
key = "{KEY_PRO}"
tier = "pro"

[[keys]]
key = "{KEY_TEAM}"
tier = "team"
"""

REQUESTS = {
    "free": ("/v1/completions", KEY_FREE, {"prompt": "Say hi", "max_tokens": 8}),
    "pro": ("/v1/completions", KEY_PRO, {"prompt": "Say hi", "max_tokens": 16}),
    "team": (
        "/v1/chat/completions",
        KEY_TEAM,
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": True},
    ),
}


def parse_hey(text: str) -> dict[str, Any]:
    """hey's summary: requests/s, latency percentiles (ms), status and error counts."""
    figures: dict[str, Any] = {"statuses": {}, "errors": 0}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        figures["rps"] = float(match.group(1))
    for pct, secs in re.findall(r"(\d+)% in ([\d.]+) secs", text):
        figures[f"p{pct}_ms"] = round(float(secs) * 1000, 2)
    for status, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text):
        figures["statuses"][status] = int(count)
    errors = text.split("Error distribution:", 1)
    if len(errors) == 2:
        figures["errors"] = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", errors[1], re.M))
        figures["error_lines"] = errors[1].strip().splitlines()[:3]
    return figures


async def hey(url: str, tier: str, seconds: float, rate: float | None, workers: int) -> Any:
    path, key, body = REQUESTS[tier]
    binary = shutil.which("hey")
    assert binary, "hey is not on PATH (apt-get install -y hey)"
    args = [binary, "-z", f"{seconds}s", "-c", str(workers), "-m", "POST", "-t", "10"]
    if rate is not None:
        args += ["-q", f"{rate / workers:.3f}"]
    args += ["-T", "application/json", "-H", f"X-API-Key: {key}", "-d", json.dumps(body)]
    process = await asyncio.create_subprocess_exec(
        *args, url + path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=seconds + 60)
    assert process.returncode == 0, out.decode()[-2000:]
    return parse_hey(out.decode())


@pytest.mark.soak
@pytest.mark.timeout(2 * SOAK_SECONDS + 600)
@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_soak_mixed_load_at_70_percent_of_capacity(
    tmp_path: Path, storage: str, figures: dict[str, Any]
) -> None:
    redis = RedisServer() if storage == "redis" else None
    if redis is not None:
        redis.start()
    try:
        url = redis.url if redis is not None else "memory://"
        with gateways(Gateway(config_text(TIERS, storage_url=url), tmp_path)) as (gateway,):
            await hey(gateway.url, "pro", 3, None, 16)  # warm up
            capacity = (await hey(gateway.url, "pro", 10, None, 16))["rps"]
            target = 0.7 * capacity
            windows: list[dict[str, Any]] = []
            deadline = time.monotonic() + SOAK_SECONDS
            while time.monotonic() < deadline - WINDOW / 2:
                results = await asyncio.gather(
                    *(
                        hey(gateway.url, tier, WINDOW, target * share, WORKERS)
                        for tier, share in SHARE.items()
                    )
                )
                window = dict(zip(SHARE, results, strict=True))
                window["rss_mib"] = round(gateway.rss_kib() / 1024, 1)
                async with http_client() as client:  # what rejected, and what is held
                    metrics = await metrics_of(client, gateway.url)
                    window["rejections"] = {
                        f"{dict(labels)['tier']}:{dict(labels)['limit']}": int(value)
                        for (name, labels), value in metrics.items()
                        if name == "quotagate_rejections_total" and value
                    }
                    window["free_slots"] = {
                        key: (await ratelimit_of(client, gateway.url, key))["concurrency"][
                            "remaining"
                        ]
                        for key in (KEY_FREE, KEY_PRO, KEY_TEAM)
                    }
                window["outages"] = gateway.count("shared storage unavailable")
                windows.append(window)
    finally:
        if redis is not None:
            redis.close()
    first, last = windows[0], windows[-1]
    rss_growth = (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    figures.update(
        storage=storage,
        soak_seconds=SOAK_SECONDS,
        capacity_rps=round(capacity),
        target_rps=round(target),
        windows=[
            {
                "rss_mib": w["rss_mib"],
                "rps": round(sum(w[tier].get("rps", 0) for tier in SHARE)),
                "rejections_so_far": w["rejections"],
                "free_slots_after": list(w["free_slots"].values()),
                "outages_so_far": w["outages"],
                **{
                    tier: {
                        "rps": round(w[tier].get("rps", 0)),
                        "p50_ms": w[tier].get("p50_ms"),
                        "p99_ms": w[tier].get("p99_ms"),
                        "statuses": w[tier]["statuses"],
                        "errors": w[tier]["errors"],
                    }
                    for tier in SHARE
                },
            }
            for w in windows
        ],
        rss_growth_after_first_window=f"{rss_growth:.1%}",
    )
    assert len(windows) >= 2
    for window in windows:
        for tier in SHARE:
            assert window[tier]["errors"] == 0, window[tier].get("error_lines")
            allowed = {"200", "429"} if tier == "free" else {"200"}
            assert set(window[tier]["statuses"]) <= allowed, (tier, window[tier]["statuses"])
        assert window["free"]["statuses"].get("429", 0) > 0  # the intended rejections
    assert rss_growth < 0.10
    for tier in ("pro", "team"):
        assert last[tier]["p99_ms"] <= 2 * first[tier]["p99_ms"] + 20, tier

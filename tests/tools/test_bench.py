"""``quotagate bench`` against a real gateway process: its counts are the gateway's own."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tools_support import cli

from quotagate.tools._gateway import GatewayProcess
from support import Stopwatch, free_port

ALICE, BOB, ERIN = "sk-free-alice-0001", "sk-free-bob-0002", "sk-pro-erin-0005"


def _served(url: str, route: str, tier: str | None = None) -> Counter[str]:
    """``quotagate_requests_total`` of ``route`` by status, from the gateway's /metrics."""
    counts: Counter[str] = Counter()
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "quotagate_requests_total"
                and labels["route"] == route
                and (tier is None or labels["tier"] == tier)
            ):
                counts[labels["status"]] += int(sample.value)
    return counts


def _bench_json(*args: str) -> dict[str, Any]:
    result = cli("bench", *args, "--json")
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_counts_match_the_gateway_metrics_exactly(gateway: GatewayProcess) -> None:
    before = _served(gateway.url, "completions")
    # No key: the anonymous tier by IP, 10/minute and one request at a time, so 4 connections
    # get 200s, 429s for the request limit and 429s for concurrency. (A request comes back
    # every 6 s: a slow run may admit one more per 6 s it took.)
    with Stopwatch() as watch:
        summary = _bench_json(gateway.url + "/v1/completions", "-n", "60", "-c", "4")
    served = _served(gateway.url, "completions") - before

    assert summary["requests"] == 60
    assert summary["errors"] == {}
    assert summary["status_counts"] == dict(sorted(served.items()))
    assert sum(summary["status_counts"].values()) == 60
    assert summary["status_counts"]["429"] >= 50 - watch.refills(6)
    assert summary["rps"] > 0
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert summary["ratelimit"]["min_remaining"] == 0


def test_keys_rotate_round_robin_and_stay_masked(gateway: GatewayProcess) -> None:
    before = _served(gateway.url, "completions", "free")
    with Stopwatch() as watch:
        result = cli(
            "bench", gateway.url + "/v1/completions", "-n", "20", "-c", "2",
            "--key", ALICE, "--key", BOB, "--json",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    # 10 requests per key against 5/minute each: 5 admitted per key (and one more per 12 s
    # the run took: a request comes back every 12 s).
    by_key = summary["by_key"]
    assert list(by_key) == ["1: sk-…0001", "2: sk-…0002"]
    for counts in by_key.values():
        assert 5 <= counts.get("200", 0) <= 5 + watch.refills(12), by_key
        assert counts.get("200", 0) + counts.get("429", 0) == 10, by_key
    admitted = sum(counts.get("200", 0) for counts in by_key.values())
    assert summary["status_counts"] == {"200": admitted, "429": 20 - admitted}
    assert dict(_served(gateway.url, "completions", "free") - before) == summary["status_counts"]
    assert summary["keys"] == ["sk-…0001", "sk-…0002"]
    assert ALICE not in result.output
    assert BOB not in result.output
    retry_after = summary["ratelimit"]["retry_after"]
    assert sum(retry_after.values()) == 20 - admitted
    assert all(1 <= int(seconds) <= 12 for seconds in retry_after)  # one request per 12 s


def test_streams_for_a_duration_with_a_plot(gateway: GatewayProcess, tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    before = _served(gateway.url, "chat")
    summary = _bench_json(
        gateway.url + "/v1/chat/completions",
        "-z", "500ms", "-c", "2", "--key", ERIN, "--stream", "--plot", str(plot),
    )  # fmt: skip
    served = _served(gateway.url, "chat") - before

    streams = summary["requests"]
    assert streams > 0
    assert summary["status_counts"] == {"200": streams} == dict(served)
    stream = summary["stream"]
    assert stream["streams"] == streams
    assert stream["tokens"] == 16 * streams  # the default body asks for max_tokens 16
    assert 0 < stream["ttft_ms"]["p50"] <= stream["ttft_ms"]["max"]
    assert stream["tokens_per_s"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_text_summary_reads_like_hey(gateway: GatewayProcess) -> None:
    result = cli("bench", gateway.url + "/health", "-n", "30", "-c", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(
        f"quotagate bench · GET {gateway.url}/health · 30 requests · 3 connections · keys: no key"
    )
    assert "Requests/sec:" in out
    assert "2xx (admitted)   30" in out
    assert "429 (limited)    0" in out
    assert "Latency (ms):" in out
    assert "min X-RateLimit-Remaining" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:{port}/v1/completions"], "cannot connect to http://127.0.0.1:{port}"),
        (["ftp://example.org/"], "expected an http:// or https:// URL"),
        (["http://127.0.0.1:{port}/", "-z", "soon"], "-z: expected a duration"),
        (["http://127.0.0.1:{port}/health", "--stream"], "--stream needs a JSON object body"),
        (["http://127.0.0.1:{port}/", "-n", "0"], "Invalid value for '-n'"),
        ([], "Missing argument 'URL'"),
    ],
)
def test_usage_and_connection_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    port = str(free_port())  # nothing listens there
    result = cli("bench", *(arg.replace("{port}", port) for arg in args))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert message.replace("{port}", port) in lines[0]

"""``quotagate verify`` against real gateways over real sockets: it passes where the gateway is
right (memory and Redis, started by verify or already running) and fails, saying why, where it
is not (everyone counted as one client, headers turned off)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tools_support import TOOLS, cli, write_config

from quotagate.tools._gateway import GatewayProcess
from support import RedisServer, UvicornServer, free_port

ALICE, BOB, CAROL, DAVE = (
    "sk-free-alice-0001",
    "sk-free-bob-0002",
    "sk-free-carol-0003",
    "sk-free-dave-0004",
)
CHECKS = ["headers", "limit_429", "retry_after", "independent_keys", "health_not_limited"]


def _report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return report


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(stdout: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"pid (\d+)", stdout)]


def test_the_embedded_default_passes_every_check_and_the_record_holds_the_evidence(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "evidence.json"
    result = cli("verify", "--restart", "--report", str(report_path))
    assert result.exit_code == 0, result.output

    out = result.stdout
    # The starting state comes first, then a verdict per check.
    assert out.index("starting state") < out.index("PASS")
    for label in ("quotagate", "python", "config", "storage", "backend", "gateway", "keys"):
        assert re.search(rf"^  {label} ", out, re.M), label
    assert "built-in default" in out
    assert "60/minute requests for tier free (from config)" in out
    assert "the 61st rapid request is 429" in out
    assert out.rstrip().endswith(
        f"6 checks: 6 passed, 0 failed · evidence written to {report_path}"
    )

    report = _report(report_path)
    assert report["version"] == report["environment"]["quotagate"]
    assert report["command"] == f"quotagate verify --restart --report {report_path}"
    assert report["passed"] is True
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", report["started_at"])
    env = report["environment"]
    assert env["config"]["path"] == "built-in default"
    assert re.fullmatch(r"[0-9a-f]{16}", env["config"]["digest"])
    assert env["storage"] == {"url": "memory://", "mode": "memory"}
    assert env["backend"] == {"kind": "mock", "url": None}
    assert env["model"] == "quotagate-mock"
    assert env["limit"] == {
        "tier": "free",
        "rate": "60/minute",
        "limit": 60,
        "window_s": 60.0,
        "source": "config",
    }
    assert [key["added_for_this_run"] for key in env["keys"]] == [True, True]

    checks = _checks(report)
    assert list(checks) == [*CHECKS, "restart_resets"]
    assert all(check["passed"] for check in checks.values())
    burst = checks["limit_429"]["evidence"]
    assert [e["response"]["status"] for e in burst] == [200] * 60 + [429]
    rejected = burst[-1]["response"]
    retry_after = int(rejected["headers"]["retry-after"])
    assert rejected["body"] == {
        "error": {
            "message": f"Too many requests. Try again in {retry_after} seconds.",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
            "retry_after": retry_after,
            "limit": "requests",
        }
    }
    assert burst[0]["request"] == {
        "method": "POST",
        "path": "/v1/completions",
        "key": env["keys"][0]["key"],
    }
    assert len(checks["health_not_limited"]["evidence"]) == 61
    restart = checks["restart_resets"]["evidence"]
    assert restart[-1]["response"]["headers"]["x-ratelimit-remaining-requests"] == "59"

    # Every gateway it started (the first, and the one after the restart) is stopped.
    pids = _pids(out)
    assert len(set(pids)) == 2
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.redis
def test_redis_counters_survive_a_restart_and_reset_after_a_reset_of_the_prefix(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    # A database of its own, as an operator would give it (the reset touches only the prefix).
    config = write_config(tmp_path, f"{redis_server.url[:-2]}/9", key_prefix)
    report_path = tmp_path / "evidence.json"
    result = cli(
        "verify",
        "--config",
        str(config),
        "--key",
        ALICE,
        "--key",
        BOB,
        "--restart",
        "--report",
        str(report_path),
    )
    assert result.exit_code == 0, result.output
    assert "5 rapid requests pass, the 6th is 429" in result.stdout

    report = _report(report_path)
    storage = report["environment"]["storage"]
    assert storage["url"] == f"{redis_server.url[:-2]}/9"
    assert storage["mode"] == "redis"
    assert re.fullmatch(r"\d+\.\d+\.\d+", storage["redis_version"])
    assert report["environment"]["config"]["file_sha256"] is not None
    restart = _checks(report)["restart_resets"]
    assert restart["passed"]
    scope = f"under prefix '{key_prefix}:' at redis://"
    assert any(note.startswith("reset: ") and scope in note for note in restart["notes"])
    after_restart, after_reset = (e["response"] for e in restart["evidence"])
    assert after_restart["status"] == 429  # Redis kept the counter across the restart
    assert after_reset["status"] == 200
    assert after_reset["headers"]["x-ratelimit-remaining-requests"] == "4"


def test_a_running_gateway_passes_and_keys_never_appear_in_full(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    report_path = tmp_path / "evidence.json"
    with GatewayProcess(str(config)) as running:
        result = cli(
            "verify",
            "--url",
            running.url,
            "--config",
            str(config),
            "--key",
            CAROL,
            "--key",
            DAVE,
            "--report",
            str(report_path),
        )
    assert result.exit_code == 0, result.output
    assert "(--url)" in result.stdout
    assert "checked only on a gateway verify starts" in result.stdout

    text = report_path.read_text("utf-8")
    for secret in (CAROL, DAVE):
        assert secret not in text
        assert secret not in result.output
    report = json.loads(text)
    assert report["command"] == (
        f"quotagate verify --url {running.url} --config {config} --key 'sk-…0003' "
        f"--key 'sk-…0004' --report {report_path}"
    )
    assert [k["key"] for k in report["environment"]["keys"]] == ["sk-…0003", "sk-…0004"]
    assert report["environment"]["gateway"]["started_by_verify"] is False
    assert list(_checks(report)) == CHECKS


@pytest.fixture(params=["right", "one_client", "headers_off"])
def fake_gateway(request: pytest.FixtureRequest) -> Iterator[tuple[str, UvicornServer]]:
    env = {
        "right": {},
        "one_client": {"FAKE_KEY_FUNC": "one_client"},
        "headers_off": {"FAKE_HEADERS": "off"},
    }[request.param]
    with UvicornServer("fake_gateway:app", app_dir=str(TOOLS), env=env) as server:
        yield request.param, server


def test_a_misconfigured_gateway_fails_with_the_reason(
    fake_gateway: tuple[str, UvicornServer], tmp_path: Path
) -> None:
    kind, server = fake_gateway
    report_path = tmp_path / "evidence.json"
    result = cli(
        "verify", "--url", server.url, "--key", ALICE, "--key", BOB, "--report", str(report_path)
    )
    checks = _checks(_report(report_path))
    failed = {name for name, check in checks.items() if not check["passed"]}

    if kind == "right":
        # The control: the same app configured right passes, limit read from its headers.
        assert result.exit_code == 0, result.output
        assert "10/minute requests for tier unknown (from the first response's headers)" in (
            result.stdout
        )
        return
    assert result.exit_code == 1, result.output
    if kind == "one_client":
        assert failed == {"independent_keys"}
        reason = checks["independent_keys"]["reason"]
        assert "counts both keys as one client" in reason
        assert "FAIL  the two keys are counted independently" in result.stdout
        assert f"reason: {reason}" in result.stdout
    else:
        assert failed == {"headers"}
        reason = checks["headers"]["reason"]
        assert reason.startswith("headers absent from 200 responses: x-ratelimit-limit")
        assert "FAIL  rate-limit headers on successful responses" in result.stdout
    assert result.stdout.rstrip().endswith(f"evidence written to {report_path}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--url", "http://127.0.0.1:{port}", "--key", "sk-a-1", "--key", "sk-b-2"],
            "cannot reach http://127.0.0.1:{port}/health",
        ),
        (["--url", "ftp://example.org", "--key", "a", "--key", "b"], "expected an http://"),
        (["--url", "http://127.0.0.1:{port}"], "give two API keys the gateway knows"),
        (["--key", "sk-only-one"], "give two API keys"),
        (["--key", "sk-same", "--key", "sk-same"], "the same key"),
        (["--url", "http://x", "--key", "a", "--key", "b", "--restart"], "--restart needs"),
        (["--config", "/nonexistent/gateway.toml"], "config: no such file"),
        (["--tier", "gold"], "--tier: unknown tier"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_usage_and_connection_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    port = str(free_port())  # nothing listens there
    result = cli("verify", *(arg.replace("{port}", port) for arg in args))
    assert result.exit_code == 2, result.output
    assert result.stdout == "" or "starting state" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert message.replace("{port}", port) in lines[0]
    assert "Traceback" not in result.output


def test_the_recorded_command_masks_keys_and_url_passwords() -> None:
    from quotagate.tools._common import masked_command

    secret, other = "sk-live-abcdef123456", "sk-live-zyxwvu987654"
    command = masked_command(
        [
            "quotagate", "verify", "--key", secret, f"--key={other}",
            "--url", "http://ops:hunter2@gw.internal:8000", "--config", "gateway.toml",
        ],
        secrets=[secret, other],
    )  # fmt: skip
    assert secret not in command
    assert other not in command
    assert "hunter2" not in command
    assert command == (
        "quotagate verify --key 'sk-…3456' '--key=sk-…7654' "
        "--url 'http://ops:***@gw.internal:8000' --config gateway.toml"
    )


def test_a_fleet_gateway_is_verified_on_the_backend_of_its_model(tmp_path: Path) -> None:
    """``--model`` picks the backend under test; the record names the fleet and that backend."""
    config = tmp_path / "fleet.toml"
    config.write_text(
        """
[[backends]]
name = "first"
kind = "mock"
models = ["model-a"]

[[backends]]
name = "second"
kind = "mock"
models = ["model-b"]

[tiers.free]
requests = "5/minute"
tokens = "100000/minute"
""",
        "utf-8",
    )
    report_path = tmp_path / "evidence.json"
    result = cli(
        "verify", "--config", str(config), "--model", "model-b", "--report", str(report_path)
    )
    assert result.exit_code == 0, result.output
    assert "fleet: first (mock), second (mock); model-b served by second" in result.stdout
    env = _report(report_path)["environment"]
    assert env["model"] == "model-b"
    assert env["backend"]["kind"] == "fleet"
    assert env["backend"]["under_test"] == "second"
    assert [b["name"] for b in env["backend"]["backends"]] == ["first", "second"]

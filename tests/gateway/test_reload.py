"""``kill -HUP``: the gateway reads its config file again. Keys, tiers and the other per-request
settings change at once; what the process is built on (storage, backend, the listening socket)
is kept with a warning; a bad file changes nothing."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import httpx
import pytest

from helpers import in_process, limits_of
from quotagate.gateway.app import Gateway, create_app
from quotagate.gateway.config import load_config
from quotagate.testing import wait_until
from support import QuotagateProcess

ALICE, BOB = "sk-reload-alice", "sk-reload-bob"

BEFORE = f"""
log_level = "info"

[tiers.free]
requests = "3/minute"

[[keys]]
key = "{ALICE}"
tier = "free"
"""

AFTER = f"""
log_level = "info"

[tiers.free]
requests = "1/minute"

[tiers.pro]
requests = "100/minute"

[[keys]]
key = "{BOB}"
tier = "pro"
"""


def gateway_of(app: object) -> Gateway:
    gateway = app.state.gateway  # type: ignore[attr-defined]
    assert isinstance(gateway, Gateway)
    return gateway


async def test_keys_and_tiers_change_at_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BEFORE, "utf-8")
    app = create_app(load_config(path, environ={}), config_path=str(path))
    async with in_process(app) as client:
        body = {"prompt": "x", "max_tokens": 1}
        alice_before = await client.post("/v1/completions", json=body, headers={"X-API-Key": ALICE})
        bob_before = await client.post("/v1/completions", json=body, headers={"X-API-Key": BOB})
        path.write_text(AFTER, "utf-8")
        assert gateway_of(app).reload()
        alice_after = await client.post("/v1/completions", json=body, headers={"X-API-Key": ALICE})
        bob_after = await client.post("/v1/completions", json=body, headers={"X-API-Key": BOB})
        bob_limits = await limits_of(client, BOB)
    assert alice_before.status_code == 200
    assert alice_before.headers["x-ratelimit-limit-requests"] == "3"
    assert bob_before.status_code == 401
    assert alice_after.status_code == 401  # a key taken out of the file is refused at once
    assert bob_after.status_code == 200, bob_after.text
    assert (bob_limits["tier"], bob_limits["requests"]["limit"]) == ("pro", 100)


async def test_a_bad_file_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BEFORE, "utf-8")
    app = create_app(load_config(path, environ={}), config_path=str(path))
    async with in_process(app) as client:
        path.write_text(BEFORE.replace('"3/minute"', '"three a minute"'), "utf-8")
        with caplog.at_level(logging.ERROR, logger="quotagate"):
            assert not gateway_of(app).reload()
        answer = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-API-Key": ALICE}
        )
    assert answer.headers["x-ratelimit-limit-requests"] == "3"
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "not reloaded" in error
    assert "tiers.free.requests" in error


async def test_what_needs_a_restart_is_kept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BEFORE + "[server]\nport = 8100\n", "utf-8")
    app = create_app(load_config(path, environ={}), config_path=str(path))
    gateway = gateway_of(app)
    changed = AFTER + (
        '[server]\nport = 8200\nmax_body_bytes = 1000\n[storage]\nurl = "redis://10.0.0.1:6379/0"\n'
        "[backend]\nmax_concurrency = 2\n"
    )
    async with in_process(app):
        path.write_text(changed, "utf-8")
        with caplog.at_level(logging.WARNING, logger="quotagate"):
            assert gateway.reload()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "quotagate: server.port, storage, backend changed, which needs a restart: "
        "the running value is kept"
    ]
    assert gateway.config.server.port == 8100
    assert gateway.config.storage.url == "memory://"
    assert gateway.config.backend.max_concurrency == 64
    assert gateway.config.server.max_body_bytes == 1000  # per request: taken
    assert set(gateway.tiers) == {"free", "pro"}


async def test_the_flags_stay_above_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BEFORE, "utf-8")
    flags = {"": {"log_level": "debug"}}
    app = create_app(load_config(path, overrides=flags), config_path=str(path), overrides=flags)
    async with in_process(app):
        assert gateway_of(app).reload()
        assert gateway_of(app).config.log_level == "debug"
        assert logging.getLogger("quotagate").level == logging.DEBUG
    logging.getLogger("quotagate").setLevel(logging.INFO)


async def test_the_built_in_default_has_nothing_to_reload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(load_config(None, environ={}))
    async with in_process(app):
        with caplog.at_level(logging.WARNING, logger="quotagate"):
            assert not gateway_of(app).reload()
    assert any("built-in default" in r.getMessage() for r in caplog.records)


def test_sighup_reloads_a_running_gateway(tmp_path: Path) -> None:
    """The signal itself, on a real ``quotagate serve``: the process lives on and serves the
    new keys."""
    path = tmp_path / "gateway.toml"
    path.write_text(BEFORE, "utf-8")
    body = {"prompt": "x", "max_tokens": 1}
    with QuotagateProcess("serve", "--config", str(path), "--port", "{port}") as gateway:
        assert gateway.process is not None
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            before = client.post("/v1/completions", json=body, headers={"X-API-Key": BOB})
            path.write_text(AFTER, "utf-8")
            os.kill(gateway.process.pid, signal.SIGHUP)
            wait_until(lambda: "reloaded" in gateway.output(), 10, "the reload logged")
            after = client.post("/v1/completions", json=body, headers={"X-API-Key": BOB})
        alive = gateway.process.poll() is None
        log = gateway.output()
    assert before.status_code == 401
    assert after.status_code == 200, after.text
    assert alive
    assert f"quotagate: reloaded {path}: 2 tiers, 1 key, backend mock" in log

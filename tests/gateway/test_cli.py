"""The ``quotagate`` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import redis

import quotagate as qg
from helpers import BAD_CONFIG, config_from, in_process, limits_of, run_cli
from quotagate.gateway.app import create_app
from quotagate.identity import hash_api_key
from quotagate.keys import key_client_id
from support import QuotagateProcess, RedisServer, free_port

GOOD = """
[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"
tokens = "2000/minute"
concurrency = 1

[tiers.free]
requests = "60/minute"

[[keys]]
key = "sk-dev-alice"
tier = "free"
"""


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD, "utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_config_exits_2_with_every_error_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG, "utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    fields = sorted(line.split(": ", 1)[0] for line in lines)
    assert fields == sorted(
        ["storage.url", "tiers.free.requests", "tiers.free.concurrency", "keys[1].tier"]
    ), lines
    for line in lines:
        assert re.match(r"^[\w\[\].]+: .+ \(got .*\)$", line), line
    tier_line = next(line for line in lines if line.startswith("keys[1].tier: "))
    assert "platinum" in tier_line
    assert "Traceback" not in result.stderr


def test_check_config_of_a_missing_or_broken_file_exits_2(tmp_path: Path) -> None:
    assert run_cli("check-config", str(tmp_path / "nope.toml")).returncode == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[tiers.free\n", "utf-8")
    result = run_cli("check-config", str(broken))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


async def test_keys_new_prints_a_key_then_a_block_that_works_when_pasted(tmp_path: Path) -> None:
    first = run_cli("keys", "new", "--tier", "pro")
    second = run_cli("keys", "new", "--tier", "pro")
    assert first.returncode == 0, first.stderr
    key = first.stdout.splitlines()[0].strip()
    assert key
    assert " " not in key
    assert second.stdout.splitlines()[0].strip() != key  # fresh every time
    block = tomllib.loads(first.stdout.split("\n", 1)[1])
    [entry] = block["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["tier"] == "pro"
    assert "key" not in entry  # only the digest goes in the config

    pasted = first.stdout.split("\n", 1)[1]
    config = config_from(tmp_path, '[tiers.pro]\nrequests = "5/minute"\n' + pasted)
    app = create_app(config, storage=qg.MemoryStorage(clock=qg.FakeClock()))
    async with in_process(app) as client:
        by_header = await limits_of(client, key)
        by_bearer = await client.get("/v1/ratelimit", headers={"Authorization": f"Bearer {key}"})
    assert by_header["tier"] == "pro"
    assert by_bearer.json()["tier"] == "pro"


def test_keys_hash_prints_the_hex_digest() -> None:
    result = run_cli("keys", "hash", "sk-dev-alice")
    assert result.returncode == 0
    assert result.stdout.strip() == hashlib.sha256(b"sk-dev-alice").hexdigest()


def test_serve_with_no_config_runs_the_embedded_default() -> None:
    """The README's first command: memory, the mock model, a tier set, a completion with
    rate-limit headers. (``--log-level info`` beats QUOTAGATE_LOG_LEVEL: the start-up line.)"""
    with QuotagateProcess(
        "serve",
        "--port",
        "{port}",
        "--log-level",
        "info",
        env={**os.environ, "QUOTAGATE_LOG_LEVEL": "error"},
    ) as gateway:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            answer = client.post("/v1/completions", json={"prompt": "Hello"})
            health = client.get("/health").json()
        log = gateway.output()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "quotagate-mock"
    assert answer.headers["x-ratelimit-limit-requests"]
    assert answer.headers["x-ratelimit-remaining-requests"]
    assert answer.headers["ratelimit-policy"]
    assert health == {
        "status": "ok",
        "storage": "memory",
        "version": qg.__version__,
        "backends": {"default": {"replicas": 1, "healthy": 1, "in_flight": 0, "queued": 0}},
    }
    start_line = next(line for line in log.splitlines() if f"quotagate {qg.__version__}" in line)
    assert "memory" in start_line
    assert "mock" in start_line
    assert "anonymous" in start_line
    assert "free" in start_line


@pytest.mark.redis
def test_serve_precedence_file_env_flag_and_the_start_up_line(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """File port < QUOTAGATE_SERVER_PORT < --port; QUOTAGATE_STORAGE_URL beats the file's
    memory://; the start-up line names the version, config, storage with its Redis version,
    backend and tiers."""
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[server]\nport = {file_port}\n[storage]\nurl = "memory://"\n'
        f'prefix = "t{uuid.uuid4().hex[:10]}"\n' + GOOD,
        "utf-8",
    )
    env = {
        **os.environ,
        "QUOTAGATE_STORAGE_URL": redis_server.url,
        "QUOTAGATE_SERVER_PORT": str(env_port),
    }
    redis_version = redis.Redis(port=redis_server.port).info("server")["redis_version"]

    with QuotagateProcess(
        "serve", "--config", str(path), "--port", "{port}", port=flag_port, env=env
    ) as gateway:
        health = httpx.get(f"{gateway.url}/health", timeout=10).json()
        refused = [_answers(file_port), _answers(env_port)]
        log = gateway.output()
    assert health["storage"] == "redis"
    assert refused == [False, False]
    start_line = next(line for line in log.splitlines() if f"quotagate {qg.__version__}" in line)
    assert str(path) in start_line
    assert f"127.0.0.1:{redis_server.port}" in start_line
    assert redis_version in start_line
    assert "mock" in start_line
    assert "anonymous" in start_line
    assert "free" in start_line

    with QuotagateProcess("serve", "--config", str(path), port=env_port, env=env) as gateway:
        assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
        assert not _answers(file_port)


def test_serve_workers_with_memory_storage_warns_limits_are_per_process(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD, "utf-8")
    with QuotagateProcess(
        "serve", "--config", str(path), "--port", "{port}", "--workers", "2"
    ) as gateway:
        answer = httpx.post(
            f"{gateway.url}/v1/completions",
            json={"prompt": "hi"},
            headers={"X-API-Key": "sk-dev-alice"},
            timeout=10,
        )
        log = gateway.output().lower()
    assert answer.status_code == 200
    assert "warning" in log
    assert "per process" in log


def test_serve_with_a_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG, "utf-8")
    result = run_cli("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "tiers.free.requests: " in result.stderr
    assert "Traceback" not in result.stderr


def _answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.redis
async def test_reset_deletes_the_configured_prefix_after_asking(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``quotagate reset``: every client's counters, or one API key's or one address's (as the
    gateway names them in its keys), never anything outside the prefix."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    path = tmp_path / "gateway.toml"
    path.write_text(f'[storage]\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n' + GOOD)
    alice = "{" + key_client_id(hash_api_key("sk-dev-alice")) + "}"
    bob = "{" + key_client_id(hash_api_key("sk-dev-bob")) + "}"
    raw = redis.Redis(port=redis_server.port)
    raw.set(f"{prefix}-foreign", "keep me")
    async with qg.RedisStorage(redis_server.url, prefix=prefix) as storage:
        limiter = qg.RateLimiter(storage)
        for client in (alice, bob, "{ip:203.0.113.7}"):
            await limiter.hit(client + ":req", "5/day")
            await limiter.hit(client + ":tok", "500/day", cost=20)

    def left() -> list[bytes]:
        return sorted(raw.keys(f"{prefix}:*"))

    try:
        declined = run_cli("reset", "--config", str(path), input="n\n")
        after_declining = len(left())
        one_key = run_cli("reset", "--config", str(path), "--key", "sk-dev-alice", "--yes")
        after_one_key = left()
        one_ip = run_cli("reset", "--config", str(path), "--ip", "203.0.113.7", "--yes")
        after_one_ip = left()
        everyone = run_cli("reset", "--config", str(path), "--yes")
        after_everyone = left()
        foreign = raw.get(f"{prefix}-foreign")
    finally:
        raw.delete(f"{prefix}-foreign")
        raw.close()
    assert declined.returncode == 1  # click's abort
    assert after_declining == 6
    assert one_key.returncode == 0, one_key.stderr
    assert one_key.stdout.strip() == (
        f"reset: 2 keys deleted (key sk-…lice) under prefix '{prefix}:' at {redis_server.url}"
    )
    assert len(after_one_key) == 4
    assert not any(alice.encode() in key for key in after_one_key)
    assert one_ip.stdout.startswith("reset: 2 keys deleted (ip 203.0.113.7)")
    assert [bob.encode() in key for key in after_one_ip] == [True, True]
    assert everyone.stdout.startswith("reset: 2 keys deleted (every client)")
    assert after_everyone == []
    assert foreign == b"keep me"


def test_reset_of_memory_storage_or_an_unreachable_redis_is_an_error(tmp_path: Path) -> None:
    memory = tmp_path / "memory.toml"
    memory.write_text(GOOD)
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(f'[storage]\nurl = "redis://127.0.0.1:{free_port()}/0"\n' + GOOD)
    in_memory = run_cli("reset", "--config", str(memory), "--yes")
    down = run_cli("reset", "--config", str(unreachable), "--yes")
    assert in_memory.returncode == 1
    assert "restart the gateway" in in_memory.stderr
    assert down.returncode == 1
    assert down.stderr.startswith("reset failed: cannot reach Redis"), down.stderr


def test_serve_over_tls_with_the_configured_certificate(tmp_path: Path) -> None:
    """``[server] tls_certfile/tls_keyfile``: the gateway speaks HTTPS on its own socket, with
    its rate-limit headers as ever; plain HTTP there gets no answer."""
    import ssl

    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\ntls_certfile = "{cert}"\ntls_keyfile = "{key}"\n' + GOOD)
    trust = ssl.create_default_context()
    authority.configure_trust(trust)
    with QuotagateProcess("serve", "--config", str(path), "--port", "{port}") as gateway:
        url = f"https://127.0.0.1:{gateway.port}"
        with httpx.Client(verify=trust, timeout=10) as client:
            answer = client.post(
                f"{url}/v1/completions",
                json={"prompt": "hi"},
                headers={"X-API-Key": "sk-dev-alice"},
            )
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gateway.port}/health", timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-limit-requests"] == "60"

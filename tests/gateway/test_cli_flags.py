"""The ``quotagate`` command's flags, fast: click's ``CliRunner`` in process, with the server run
(``quotagate.gateway.server.run``) and the counter reset replaced by recorders, so each test
asserts what a flag maps to, in milliseconds. ``test_cli.py`` runs the same commands as real
processes over real sockets."""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from helpers import BAD_CONFIG
from quotagate.cli import main
from quotagate.errors import ConfigError
from quotagate.gateway import server
from quotagate.gateway.config import GatewayConfig, load_config
from quotagate.identity import hash_api_key, mask_key
from quotagate.keys import key_client_id

GOOD = """
[server]
host = "127.0.0.2"
port = 8111

[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"

[tiers.free]
requests = "60/minute"

[[keys]]
key = "sk-dev-alice"
tier = "free"
"""


REDIS = '[storage]\nurl = "redis://127.0.0.1:1/0"\nprefix = "flags"\n'


@dataclass
class Runs:
    """What ``server.run`` was called with, one entry per call."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def one(self) -> dict[str, Any]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]

    @property
    def config(self) -> GatewayConfig:
        config: GatewayConfig = self.one["config"]
        return config


@pytest.fixture(autouse=True)
def no_quotagate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No QUOTAGATE_* variable of the shell running the tests changes what a flag maps to."""
    for name in list(os.environ):
        if name.startswith("QUOTAGATE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Runs:
    """``server.run`` recorded instead of serving."""
    recorded = Runs()

    def run(
        config: GatewayConfig,
        *,
        config_path: str | None = None,
        overrides: Any = None,
        workers: int = 1,
    ) -> None:
        recorded.calls.append(
            {
                "config": config,
                "config_path": config_path,
                "overrides": overrides,
                "workers": workers,
            }
        )

    monkeypatch.setattr(server, "run", run)
    return recorded


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def config_error_lines(path: Path) -> list[str]:
    """The lines of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    return str(raised.value).splitlines()


# --- serve -------------------------------------------------------------------------------------


def test_serve_without_flags_runs_the_embedded_default_in_one_process(runs: Runs) -> None:
    result = cli("serve")
    assert result.exit_code == 0, result.output
    assert runs.one["config_path"] is None
    assert runs.one["overrides"] == {}
    assert runs.one["workers"] == 1
    assert runs.config == load_config(None, environ={})
    assert (runs.config.server.host, runs.config.server.port) == ("127.0.0.1", 8000)
    assert result.stderr == ""


def test_config_names_the_file_that_is_served_and_handed_to_run(runs: Runs, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = cli("serve", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert runs.one["config_path"] == str(path)  # workers and SIGHUP read it again
    assert runs.config == load_config(path, environ={})
    assert sorted(runs.config.tiers) == ["anonymous", "free"]
    assert (runs.config.server.host, runs.config.server.port) == ("127.0.0.2", 8111)


def test_host_and_port_override_the_file_and_the_environment(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("QUOTAGATE_SERVER_PORT", "8222")
    monkeypatch.setenv("QUOTAGATE_HOST", "127.0.0.3")
    from_env = cli("serve", "--config", str(path))
    from_flags = cli("serve", "--config", str(path), "--host", "0.0.0.0", "--port", "9333")
    assert from_env.exit_code == 0, from_env.output
    assert from_flags.exit_code == 0, from_flags.output
    env_run, flag_run = runs.calls
    assert env_run["overrides"] == {}
    assert (env_run["config"].server.host, env_run["config"].server.port) == ("127.0.0.3", 8222)
    assert flag_run["overrides"] == {"server": {"host": "0.0.0.0", "port": 9333}}
    assert (flag_run["config"].server.host, flag_run["config"].server.port) == ("0.0.0.0", 9333)


@pytest.mark.parametrize("port", ["eighty", "1.5"])
def test_a_port_that_is_not_a_number_is_a_usage_error(runs: Runs, port: str) -> None:
    result = cli("serve", "--port", port)
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.stderr
    assert runs.calls == []


def test_a_port_out_of_range_is_a_config_error_naming_the_field(runs: Runs) -> None:
    result = cli("serve", "--port", "70000")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("server.port: ")
    assert "70000" in line
    assert runs.calls == []


def test_workers_are_handed_to_run(runs: Runs, tmp_path: Path) -> None:
    path = write(tmp_path, REDIS + GOOD)
    result = cli("serve", "--config", str(path), "--workers", "4")
    assert result.exit_code == 0, result.output
    assert runs.one["workers"] == 4
    assert result.stderr == ""  # Redis storage: the workers share their limits, no warning


def test_workers_with_memory_storage_warn_that_limits_are_per_process(runs: Runs) -> None:
    result = cli("serve", "--workers", "3")
    assert result.exit_code == 0, result.output
    assert runs.one["workers"] == 3
    [warning] = result.stderr.splitlines()
    assert warning == server.check_workers(runs.config, 3)
    assert warning.startswith("warning: --workers 3 with memory storage")
    assert "per process (3x the configured traffic gets through)" in warning
    assert result.stdout == ""


def test_one_worker_with_memory_storage_does_not_warn(runs: Runs) -> None:
    assert cli("serve", "--workers", "1").stderr == ""
    assert runs.one["workers"] == 1


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_workers_below_one_are_a_usage_error(runs: Runs, workers: str) -> None:
    result = cli("serve", "--workers", workers)
    assert result.exit_code == 2
    assert "Invalid value for '--workers'" in result.stderr
    assert runs.calls == []


@pytest.mark.parametrize("level", ["critical", "error", "warning", "info", "debug"])
def test_log_level_overrides_the_file_and_the_environment(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    path = write(tmp_path, 'log_level = "critical"\n' + GOOD)
    monkeypatch.setenv("QUOTAGATE_LOG_LEVEL", "error")
    result = cli("serve", "--config", str(path), "--log-level", level)
    assert result.exit_code == 0, result.output
    assert runs.one["overrides"] == {"": {"log_level": level}}
    assert runs.config.log_level == level


def test_without_log_level_the_environment_beats_the_file(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'log_level = "critical"\n' + GOOD)
    assert cli("serve", "--config", str(path)).exit_code == 0
    monkeypatch.setenv("QUOTAGATE_LOG_LEVEL", "debug")
    assert cli("serve", "--config", str(path)).exit_code == 0
    assert [run["config"].log_level for run in runs.calls] == ["critical", "debug"]


def test_an_unknown_log_level_is_a_usage_error_listing_the_levels(runs: Runs) -> None:
    result = cli("serve", "--log-level", "loud")
    assert result.exit_code == 2
    assert "'critical', 'error', 'warning', 'info', 'debug'" in result.stderr
    assert runs.calls == []


def test_serve_with_a_bad_config_exits_2_with_each_error_on_its_own_line(
    runs: Runs, tmp_path: Path
) -> None:
    path = write(tmp_path, BAD_CONFIG)
    result = cli("serve", "--config", str(path), "--port", "9000")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == config_error_lines(path)
    fields = sorted(line.split(": ", 1)[0] for line in result.stderr.splitlines())
    assert fields == [
        "keys[1].tier",
        "storage.url",
        "tiers.free.concurrency",
        "tiers.free.requests",
    ]
    assert result.stdout == ""
    assert runs.calls == []  # nothing served


@pytest.mark.parametrize(
    ("text", "needle"), [(None, "nope.toml"), ("[tiers.free\n", "broken.toml")]
)
def test_serve_with_a_missing_or_broken_file_exits_2_naming_it(
    runs: Runs, tmp_path: Path, text: str | None, needle: str
) -> None:
    path = tmp_path / needle if text is None else write(tmp_path, text, needle)
    result = cli("serve", "--config", str(path))
    assert result.exit_code == 2
    assert needle in result.stderr
    assert runs.calls == []


# --- check-config ------------------------------------------------------------------------------


def test_check_config_ok_summarises_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = cli("check-config", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{path}: OK · storage memory:// · backend mock · tiers anonymous, free · 1 key\n"
    )


def test_check_config_shows_a_redis_url_without_its_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[storage]\nurl = "redis://:hunter2@127.0.0.1:6379/0"\n' + GOOD)
    result = cli("check-config", str(path))
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.stdout
    assert "storage 127.0.0.1:6379/0 · " in result.stdout


def test_check_config_reads_the_file_alone_not_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("QUOTAGATE_STORAGE_URL", "memcached://not-a-storage")
    monkeypatch.setenv("QUOTAGATE_PORT", "not-a-port")
    result = cli("check-config", str(path))
    assert result.exit_code == 0, result.output
    assert "storage memory://" in result.stdout


def test_check_config_exits_2_with_each_error_on_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_CONFIG)
    result = cli("check-config", str(path))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == config_error_lines(path)
    assert len(result.stderr.splitlines()) == 4
    assert result.stdout == ""


def test_check_config_needs_a_path() -> None:
    result = cli("check-config")
    assert result.exit_code == 2
    assert "Missing argument 'PATH'" in result.stderr


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "tier", "name"),
    [((), "free", None), (("--tier", "pro", "--name", "ci-runner"), "pro", "ci-runner")],
)
def test_keys_new_prints_a_fresh_key_then_its_block(
    flags: tuple[str, ...], tier: str, name: str | None
) -> None:
    first, second = cli("keys", "new", *flags), cli("keys", "new", *flags)
    assert first.exit_code == 0, first.output
    key, blank, block = first.stdout.split("\n", 2)
    assert key.startswith("sk-qg-")
    assert len(key) > 40
    assert blank == ""
    assert second.stdout.splitlines()[0] != key
    expected = {"sha256": hashlib.sha256(key.encode()).hexdigest(), "tier": tier}
    if name is not None:
        expected["name"] = name
    assert tomllib.loads(block) == {"keys": [expected]}


def test_keys_hash_prints_the_digest_the_config_holds() -> None:
    result = cli("keys", "hash", "sk-dev-alice")
    assert result.exit_code == 0
    assert result.stdout == hashlib.sha256(b"sk-dev-alice").hexdigest() + "\n"
    assert result.stdout.strip() == hash_api_key("sk-dev-alice")


def test_keys_hash_needs_a_key() -> None:
    result = cli("keys", "hash")
    assert result.exit_code == 2
    assert "Missing argument 'KEY'" in result.stderr


# --- reset -------------------------------------------------------------------------------------


@pytest.fixture
def resets(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """``server.reset_counters`` recorded (the client id it was asked to forget, None for every
    client); it reports 3 keys deleted."""
    asked: list[str | None] = []

    async def reset_counters(storage: Any, client: str | None = None) -> int:
        asked.append(client)
        return 3

    monkeypatch.setattr(server, "reset_counters", reset_counters)
    return asked


def scope_of(path: Path) -> str:
    """What the reset of the config at ``path`` says it touches (prefix and masked URL)."""
    config = load_config(path, environ={})
    storage = server.redis_of(config)
    assert storage is not None
    scope = server.describe_storage(storage, config.storage.url)
    assert "flags" in scope
    assert "redis://127.0.0.1:1/0" in scope
    return scope


def test_reset_takes_key_or_ip_not_both(resets: list[str | None], tmp_path: Path) -> None:
    path = write(tmp_path, REDIS + GOOD)
    result = cli("reset", "--config", str(path), "--key", "sk-dev-alice", "--ip", "10.0.0.1")
    assert result.exit_code == 2
    assert result.stderr == "give --key or --ip, not both\n"
    assert resets == []


@pytest.mark.parametrize(
    ("flags", "client", "whose"),
    [
        ((), None, "every client"),
        (
            ("--key", "sk-dev-alice"),
            key_client_id(hash_api_key("sk-dev-alice")),
            f"key {mask_key('sk-dev-alice')}",
        ),
        (("--ip", "203.0.113.7"), "ip:203.0.113.7", "ip 203.0.113.7"),
    ],
)
def test_reset_maps_its_flags_to_the_client_it_forgets(
    resets: list[str | None],
    tmp_path: Path,
    flags: tuple[str, ...],
    client: str | None,
    whose: str,
) -> None:
    path = write(tmp_path, REDIS + GOOD)
    result = cli("reset", "--config", str(path), *flags, "--yes")
    assert result.exit_code == 0, result.output
    assert resets == [client]
    assert result.stdout == f"reset: 3 keys deleted ({whose}) under {scope_of(path)}\n"


def test_reset_asks_first_and_a_no_deletes_nothing(
    resets: list[str | None], tmp_path: Path
) -> None:
    path = write(tmp_path, REDIS + GOOD)
    declined = cli("reset", "--config", str(path), "--ip", "203.0.113.7", input="n\n")
    assert declined.exit_code == 1  # click's abort
    assert f"Delete the counters of ip 203.0.113.7 under {scope_of(path)}?" in declined.output
    assert resets == []
    accepted = cli("reset", "--config", str(path), input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert resets == [None]


def test_reset_of_memory_storage_says_to_restart_the_gateway(
    resets: list[str | None], tmp_path: Path
) -> None:
    result = cli("reset", "--config", str(write(tmp_path, GOOD)), "--yes")
    assert result.exit_code == 1
    assert "restart the gateway to reset them" in result.stderr
    assert resets == []


def test_reset_with_a_bad_config_exits_2_with_each_error(
    resets: list[str | None], tmp_path: Path
) -> None:
    path = write(tmp_path, BAD_CONFIG)
    result = cli("reset", "--config", str(path), "--yes")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == config_error_lines(path)
    assert resets == []

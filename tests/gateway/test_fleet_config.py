"""``[[backends]]`` in the config: what a fleet file may say, and every problem named by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import config_from, run_cli
from quotagate.errors import ConfigError
from quotagate.gateway.config import LEGACY_BACKEND, load_config

GOOD = """
[[backends]]
name = "big"
kind = "openai"
urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
models = ["llama-3-70b"]
max_concurrency = 32
queue_timeout_ms = 2000
api_key_env = "VLLM_API_KEY"
timeout_s = 600
connect_timeout_s = 5
health_interval_s = 5

[backends.aliases]
"gpt-4o-mini" = "llama-3-70b"

[[backends]]
name = "small"
kind = "mock"
models = ["quotagate-mock"]
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config_from(tmp_path, text)
    return str(raised.value).splitlines()


def test_the_issue_example_loads(tmp_path: Path) -> None:
    config = config_from(tmp_path, GOOD)
    big, small = config.fleet
    assert (big.name, big.kind, big.max_concurrency, big.health_interval_s) == (
        "big",
        "openai",
        32,
        5,
    )
    assert big.urls == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert big.aliases == {"gpt-4o-mini": "llama-3-70b"}
    assert (small.kind, small.urls, small.models) == ("mock", [], ["quotagate-mock"])


def test_a_single_backend_table_is_a_fleet_of_one_catch_all_replica(tmp_path: Path) -> None:
    config = config_from(tmp_path, '[backend]\nkind = "openai"\nurl = "http://10.0.0.1:8000/v1"\n')
    (only,) = config.fleet
    assert only.name == LEGACY_BACKEND
    assert only.urls == ["http://10.0.0.1:8000/v1"]
    assert only.models == ["*"]
    assert only.health_interval_s == 0  # never marked down: as before fleets
    assert load_config().fleet[0].kind == "mock"  # the embedded default


def test_backend_and_backends_together_are_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, '[backend]\nkind = "mock"\n' + GOOD)
    assert len(found) == 1
    assert found[0].startswith("backends: give one [backend] table or [[backends]] entries")


def test_check_config_names_every_fleet_problem_by_path(tmp_path: Path) -> None:
    text = """
[[backends]]
name = "big"
kind = "openai"
urls = ["http://127.0.0.1:8001/v1", "ftp://127.0.0.1:8002"]
models = ["llama-3-70b"]

[backends.aliases]
"gpt-4o-mini" = "llama-3-70b"

[[backends]]
name = "big"
kind = "mock"
urls = ["http://127.0.0.1:9000/v1"]
models = ["llama-3-70b"]

[[backends]]
name = "third"
kind = "openai"
urls = ["http://127.0.0.1:8003/v1"]
models = ["*", "gpt-4o-mini"]

[[backends]]
name = "fourth"
kind = "openai"
urls = []
models = ["*"]

[[backends]]
name = "fifth"
kind = "openai"
urls = ["http://127.0.0.1:8005/v1"]
models = ["*"]
"""
    path = tmp_path / "fleet.toml"
    path.write_text(text, "utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    expected = [
        "backends[0].urls[1]: expected an http:// or https:// URL (got 'ftp://127.0.0.1:8002')",
        "backends[1].name: the same name as backends[0] (got 'big')",
        "backends[1].urls: not allowed for kind = \"mock\" (got ['http://127.0.0.1:9000/v1'])",
        "backends[1].models[0]: also served by backends[0].models[0] (got 'llama-3-70b')",
        "backends[2].models[1]: also served by backends[0].aliases.gpt-4o-mini (got 'gpt-4o-mini')",
        "backends[2].models: \"*\" stands alone (got ['*', 'gpt-4o-mini'])",
        'backends[3].urls: required when kind = "openai" (got [])',
        "backends[3].models[0]: \"*\" is already the catch-all of backends[2] (got '*')",
        "backends[4].models[0]: \"*\" is already the catch-all of backends[2] (got '*')",
    ]
    assert sorted(lines) == sorted(expected)


def test_an_alias_may_not_name_a_model_of_its_own_or_another_backend(tmp_path: Path) -> None:
    own = GOOD.replace('"gpt-4o-mini" = "llama-3-70b"', '"llama-3-70b" = "llama-3-70b"')
    assert problems(tmp_path, own) == [
        "backends[0].aliases.llama-3-70b: the name of a model this backend serves "
        "(got 'llama-3-70b')"
    ]
    other = GOOD.replace('"gpt-4o-mini" = "llama-3-70b"', '"quotagate-mock" = "llama-3-70b"')
    assert problems(tmp_path, other) == [
        "backends[1].models[0]: also served by backends[0].aliases.quotagate-mock "
        "(got 'quotagate-mock')"
    ]


def test_check_config_summarises_a_fleet(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(GOOD, "utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "backends big (openai), small (mock)" in result.stdout

"""The gateway's TOML configuration: the issue's names, defaults < file < QUOTAGATE_* env < flags,
and errors that name the field as ``field.path: problem (got X)``, every one on its own line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import quotagate as qg
from helpers import config_from, run_cli
from quotagate.gateway.config import DEV_KEY, GatewayConfig, load_config
from quotagate.storage import SCHEMES

# The issue's example, verbatim (comments and all).
ISSUE_EXAMPLE = """
[server]
host = "127.0.0.1"
port = 8000
trusted_proxies = []                 # CIDRs whose X-Forwarded-For is believed
max_body_bytes = 1048576

[storage]
url = "memory://"                    # or "redis://127.0.0.1:6379/0"
fallback = "memory"                  # memory | allow | deny, when Redis is down
timeout_ms = 100

[backend]
kind = "mock"                        # mock | openai
url = "http://127.0.0.1:9000/v1"     # for kind = "openai"
api_key_env = "UPSTREAM_API_KEY"     # optional, sent upstream as Bearer
max_concurrency = 64                 # whole-backend cap: protects the GPU
queue_timeout_ms = 2000              # wait this long for a slot, then 503 + Retry-After
mock_tokens_per_second = 0           # 0 = instant; >0 simulates generation speed

[health]
requests = "600/minute"              # per client, separate from inference limits

[anonymous]                          # requests without a key; remove the table to answer 401
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"
tokens = "2000/minute"
concurrency = 1

[tiers.free]
requests = "60/minute"
tokens = "40000/minute; 1000000/day"
concurrency = 4
priority = 1                         # higher is served first when the backend is saturated
default_max_tokens = 1024            # injected upstream when a request sets no output cap

[[keys]]
key = "sk-dev-alice"                 # plain, for development; or sha256 = "<hex digest>"
tier = "free"
name = "alice"
"""

LINE = re.compile(r"^[A-Za-z_][\w\[\].]*: .+ \(got .*\)$")


def test_the_default_needs_no_file_memory_mock_and_a_tier_set() -> None:
    config = load_config(None, environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.server.max_body_bytes == 1_048_576
    assert config.server.request_timeout_s == 30
    assert config.storage.url == "memory://"
    assert config.backend.kind == "mock"
    assert config.anonymous is not None
    assert config.anonymous.tier in config.tiers
    assert {"anonymous", "free"} <= set(config.tiers)


# The built-in default as it was written out in full, before it left the models' defaults to them.
FULL_DEFAULT = """
[server]
host = "127.0.0.1"
port = 8000
trusted_proxies = []
max_body_bytes = 1048576

[storage]
url = "memory://"

[backend]
kind = "mock"
max_concurrency = 64
queue_timeout_ms = 2000
mock_tokens_per_second = 0

[health]
requests = "600/minute"

[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"
tokens = "2000/minute"
concurrency = 1

[tiers.free]
requests = "60/minute"
tokens = "40000/minute; 1000000/day"
concurrency = 4
priority = 1
default_max_tokens = 1024

[tiers.pro]
requests = "300/minute"
tokens = "400000/minute"
concurrency = 16
priority = 10
default_max_tokens = 4096

[[keys]]
key = "sk-dev-alice"
tier = "free"
name = "dev"
"""


def test_the_default_is_the_full_default_it_was_written_as_field_by_field() -> None:
    expected = GatewayConfig.model_validate(tomllib.loads(FULL_DEFAULT)).model_dump()
    assert load_config(None, environ={}).model_dump() == expected


def test_the_issue_example_is_a_valid_config(tmp_path: Path) -> None:
    config = config_from(tmp_path, ISSUE_EXAMPLE)
    assert config.server.trusted_proxies == []
    assert config.storage.fallback == "memory"
    assert config.storage.timeout_ms == 100
    assert config.backend.url == "http://127.0.0.1:9000/v1"
    assert config.backend.api_key_env == "UPSTREAM_API_KEY"
    assert config.backend.max_concurrency == 64
    assert config.backend.queue_timeout_ms == 2000
    assert config.backend.mock_tokens_per_second == 0
    assert config.health.requests == "600/minute"
    free = config.tiers["free"]
    assert (free.requests, free.tokens, free.concurrency) == (
        "60/minute",
        "40000/minute; 1000000/day",
        4,
    )
    assert (free.priority, free.default_max_tokens) == (1, 1024)
    assert [(k.key, k.tier, k.name) for k in config.keys] == [("sk-dev-alice", "free", "alice")]


def test_a_file_overrides_only_what_it_sets(tmp_path: Path) -> None:
    config = config_from(tmp_path, "[server]\nport = 9123\n")
    assert config.server.port == 9123
    assert config.server.host == "127.0.0.1"  # default kept
    assert config.storage.url == "memory://"
    assert config.backend.kind == "mock"


def test_environment_overrides_the_file_and_flags_override_the_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[server]\nport = 9001\nhost = "127.0.0.1"\n[storage]\nurl = "memory://"\n'
        '[backend]\nkind = "mock"\nqueue_timeout_ms = 10\n',
        "utf-8",
    )
    environ = {
        "QUOTAGATE_STORAGE_URL": "redis://10.1.2.3:6379/2",
        "QUOTAGATE_SERVER_PORT": "9002",
        "QUOTAGATE_BACKEND_KIND": "openai",
        "QUOTAGATE_BACKEND_URL": "http://10.9.9.9:8000/v1",
    }
    from_env = load_config(path, environ=environ)
    assert from_env.storage.url == "redis://10.1.2.3:6379/2"
    assert from_env.server.port == 9002
    assert from_env.backend.kind == "openai"
    assert from_env.backend.url == "http://10.9.9.9:8000/v1"
    assert from_env.backend.queue_timeout_ms == 10  # the file's, untouched by the env

    from_flags = load_config(
        path, environ=environ, overrides={"server": {"port": 9003, "host": "0.0.0.0"}}
    )
    assert from_flags.server.port == 9003
    assert from_flags.server.host == "0.0.0.0"
    assert from_flags.storage.url == "redis://10.1.2.3:6379/2"


def test_the_environment_overrides_the_built_in_default_too() -> None:
    config = load_config(None, environ={"QUOTAGATE_STORAGE_URL": "redis://127.0.0.1:1/0"})
    assert config.storage.url == "redis://127.0.0.1:1/0"
    assert config.backend.kind == "mock"


def test_the_request_timeout_is_set_by_file_or_environment_and_must_be_positive(
    tmp_path: Path,
) -> None:
    assert (
        config_from(tmp_path, "[server]\nrequest_timeout_s = 2.5\n").server.request_timeout_s == 2.5
    )
    from_env = load_config(None, environ={"QUOTAGATE_SERVER_REQUEST_TIMEOUT_S": "7"})
    assert from_env.server.request_timeout_s == 7
    with pytest.raises(qg.ConfigError, match=r"server\.request_timeout_s"):
        config_from(tmp_path, "[server]\nrequest_timeout_s = 0\n")


def test_a_bad_environment_value_names_the_field() -> None:
    with pytest.raises(qg.ConfigError) as info:
        load_config(None, environ={"QUOTAGATE_SERVER_PORT": "eighty"})
    assert str(info.value).startswith("server.port: ")
    assert "eighty" in str(info.value)


def test_every_error_on_its_own_line_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[server]
port = 70000

[storage]
fallback = "sometimes"

[tiers.free]
requests = "lots"
concurrency = 0

[[keys]]
key = "sk-x"
tier = "gold"
""",
        "utf-8",
    )
    with pytest.raises(qg.ConfigError) as info:
        load_config(path, environ={})
    lines = str(info.value).splitlines()
    by_field = {line.split(": ", 1)[0]: line for line in lines}
    assert set(by_field) == {
        "server.port",
        "storage.fallback",
        "tiers.free.requests",
        "tiers.free.concurrency",
        "keys[0].tier",
    }, lines
    for line in lines:
        assert LINE.match(line), line
    assert "(got 'lots')" in by_field["tiers.free.requests"]
    assert "(got 'gold')" in by_field["keys[0].tier"]
    assert "70000" in by_field["server.port"]
    assert "sometimes" in by_field["storage.fallback"]


def test_an_openai_backend_needs_its_url(tmp_path: Path) -> None:
    with pytest.raises(qg.ConfigError) as info:
        config_from(tmp_path, '[backend]\nkind = "openai"\n')
    assert str(info.value).startswith("backend.url: ")


def test_anonymous_tier_must_exist(tmp_path: Path) -> None:
    with pytest.raises(qg.ConfigError) as info:
        config_from(tmp_path, '[anonymous]\ntier = "guest"\n[tiers.free]\nrequests = "1/second"\n')
    assert str(info.value).startswith("anonymous.tier: ")
    assert "guest" in str(info.value)


def test_not_toml_and_no_such_file_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1\n", "utf-8")
    with pytest.raises(qg.ConfigError):
        load_config(broken, environ={})
    with pytest.raises(qg.ConfigError):
        load_config(tmp_path / "missing.toml", environ={})


def test_tls_files_must_exist_and_come_in_pairs(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here: uvicorn loads it")
    with pytest.raises(qg.ConfigError) as missing:
        config_from(tmp_path, f'[server]\ntls_certfile = "{tmp_path / "nope.pem"}"\n')
    with pytest.raises(qg.ConfigError) as alone:
        config_from(tmp_path, f'[server]\ntls_certfile = "{cert}"\n')
    both = config_from(tmp_path, f'[server]\ntls_certfile = "{cert}"\ntls_keyfile = "{cert}"\n')
    assert str(missing.value).startswith("server.tls_certfile: no such file")
    assert "give both or neither" in str(alone.value)
    assert both.server.tls_keyfile == str(cert)


def test_a_valkeys_url_is_a_valid_storage(tmp_path: Path) -> None:
    # It was accepted by storage_from_url but refused here: the config kept its own scheme list.
    path = tmp_path / "valkeys.toml"
    path.write_text('[storage]\nurl = "valkeys://127.0.0.1:6380/0"\n', "utf-8")
    assert load_config(path, environ={}).storage.url == "valkeys://127.0.0.1:6380/0"
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_a_bad_storage_scheme_lists_the_accepted_ones_and_hides_the_password(
    tmp_path: Path,
) -> None:
    with pytest.raises(qg.ConfigError) as info:
        config_from(tmp_path, '[storage]\nurl = "memcached://user:s3cret@x"\n')
    message = str(info.value)
    assert message.startswith("storage.url: ")
    assert LINE.match(message), message
    for scheme in SCHEMES:
        assert f" {scheme}://" in message, scheme
    assert "(got 'memcached://user:***@x')" in message
    assert "s3cret" not in message


def test_a_prefix_with_a_hash_tag_brace_is_refused_by_the_config(tmp_path: Path) -> None:
    # The storage refuses it at start; check-config must say so first, by its path.
    path = tmp_path / "brace.toml"
    path.write_text('[storage]\nurl = "redis://127.0.0.1:6379/0"\nprefix = "q{g}"\n')
    with pytest.raises(qg.ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        "storage.prefix: a key prefix cannot hold a hash tag brace (got 'q{g}')"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_the_default_has_its_development_key_on_loopback(host: str) -> None:
    config = load_config(None, environ={}, overrides={"server": {"host": host}})
    assert [(k.key, k.tier) for k in config.keys] == [(DEV_KEY, "free")]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "gateway.internal"])
def test_the_default_has_no_development_key_where_others_can_reach_it(host: str) -> None:
    assert load_config(None, environ={}, overrides={"server": {"host": host}}).keys == []
    assert load_config(None, environ={"QUOTAGATE_HOST": host}).keys == []


def test_a_config_file_never_gets_the_development_key(tmp_path: Path) -> None:
    assert config_from(tmp_path, '[tiers.free]\nrequests = "1/minute"\n').keys == []

"""Storage URLs: every scheme a storage declares and every fallback policy is accepted by
``storage_from_url`` and by the gateway's config alike, and a refusal names them all (one
definition, read everywhere)."""

from __future__ import annotations

import pytest

import quotagate as qg
from quotagate.gateway.config import GatewayConfig
from quotagate.storage import FALLBACK_POLICIES, SCHEMES, URL_PARAMS, scheme_error
from quotagate.storage.base import REDIS_SCHEMES


def test_the_schemes_are_those_the_storages_declare() -> None:
    assert (*qg.MemoryStorage.SCHEMES, *qg.RedisStorage.SCHEMES) == SCHEMES
    assert qg.RedisStorage.SCHEMES is REDIS_SCHEMES
    assert "valkeys" in SCHEMES


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_accepted_by_the_storage_and_the_config(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:6380/0"
    expected = qg.MemoryStorage if scheme == "memory" else qg.FallbackStorage
    assert isinstance(qg.storage_from_url(url), expected)
    assert GatewayConfig.model_validate({"storage": {"url": url}}).storage.url == url


def test_valkeys_is_a_redis_url_over_tls() -> None:
    storage = qg.storage_from_url("valkeys://127.0.0.1:6380/0?fallback=none")
    assert isinstance(storage, qg.RedisStorage)
    assert storage.url == "valkeys://127.0.0.1:6380/0"


def test_a_refused_scheme_names_every_accepted_one() -> None:
    problem = scheme_error("memcached://x")
    assert problem is not None
    for scheme in SCHEMES:
        assert f" {scheme}://" in problem, scheme
    with pytest.raises(qg.ConfigError) as info:
        qg.storage_from_url("memcached://user:s3cret@x")
    assert problem in str(info.value)
    assert "s3cret" not in str(info.value)


def test_our_query_parameters_are_taken_off_and_the_rest_passed_on() -> None:
    ours = {
        "fallback": "none",
        "fallback_share": "0.5",
        "timeout_ms": "50",
        "prefix": "p",
        "max_keys": "3",
    }
    assert set(ours) == set(URL_PARAMS)
    query = "&".join(f"{name}={value}" for name, value in ours.items())
    storage = qg.storage_from_url(f"redis://h/0?{query}&health_check_interval=5")
    assert isinstance(storage, qg.RedisStorage)
    assert storage.url == "redis://h/0?health_check_interval=5"
    assert (storage.prefix, storage.timeout) == ("p:", 0.05)


@pytest.mark.parametrize("policy", FALLBACK_POLICIES)
def test_every_fallback_policy_is_accepted_by_the_url_the_storage_and_the_config(
    policy: str,
) -> None:
    storage = qg.storage_from_url(f"redis://h/0?fallback={policy}")
    assert isinstance(storage, qg.FallbackStorage)
    assert storage.policy == policy
    config = GatewayConfig.model_validate({"storage": {"fallback": policy}})
    assert config.storage.fallback == policy


def test_a_bad_fallback_policy_names_every_good_one() -> None:
    with pytest.raises(qg.ConfigError) as info:
        qg.storage_from_url("redis://h/0?fallback=maybe")
    for policy in (*FALLBACK_POLICIES, "none"):
        assert policy in str(info.value)
    with pytest.raises(qg.ConfigError, match="allow"):
        qg.FallbackStorage(qg.MemoryStorage(), policy="maybe")  # type: ignore[arg-type]

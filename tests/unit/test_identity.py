from __future__ import annotations

import gc
from typing import Any

import pytest

import quotagate as qg
from quotagate.identity import (
    ClientKey,
    TrustedProxies,
    api_key_or_ip,
    client_ip,
    display_key,
    get_remote_address,
    hash_api_key,
    mask_key,
    storage_id,
    with_trusted_proxies,
)


class FakeRequest:
    def __init__(self, peer: str = "192.0.2.1", headers: dict[str, str] | None = None) -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "client": (peer, 50000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        }


def test_api_key_header_is_hashed() -> None:
    key = api_key_or_ip(FakeRequest(headers={"X-API-Key": "sk-live-abcdef123456"}))
    assert key == "key:" + hash_api_key("sk-live-abcdef123456")[:20]
    assert "abcdef" not in key
    assert display_key(key) == "sk-…3456"


def test_new_clients_leave_nothing_for_the_garbage_collector_to_walk() -> None:
    """Keys are remembered as plain strings (a key seen again costs no SHA-256), not as
    objects the collector tracks: a flood of new clients must not make collections longer."""
    requests = [FakeRequest(headers={"X-API-Key": f"sk-flood-{i:06d}"}) for i in range(2000)]
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        keys = [api_key_or_ip(request) for request in requests]
        del keys
        after = gc.get_count()[0]
    finally:
        gc.enable()
    assert after - before < 50  # was one tracked object per new client


def test_bearer_token_is_the_same_client_as_the_header() -> None:
    by_header = api_key_or_ip(FakeRequest(headers={"X-API-Key": "sk-1234567890"}))
    by_bearer = api_key_or_ip(FakeRequest(headers={"Authorization": "Bearer sk-1234567890"}))
    assert by_header == by_bearer


def test_no_key_falls_back_to_the_client_ip() -> None:
    assert api_key_or_ip(FakeRequest("203.0.113.7")) == "ip:203.0.113.7"
    assert (
        api_key_or_ip(FakeRequest(headers={"Authorization": "Basic dXNlcjpwdw=="}))
        == "ip:192.0.2.1"
    )
    assert display_key(api_key_or_ip(FakeRequest("203.0.113.7"))) == "ip:203.0.113.7"


def test_get_remote_address_is_the_direct_peer() -> None:
    request = FakeRequest("203.0.113.7", {"X-Forwarded-For": "198.51.100.1"})
    assert get_remote_address(request) == "203.0.113.7"


def test_forwarded_for_ignored_from_an_untrusted_peer() -> None:
    key_func = client_ip(trusted_proxies=["10.0.0.0/8"])
    spoofed = FakeRequest("203.0.113.7", {"X-Forwarded-For": "198.51.100.1"})
    assert key_func(spoofed) == "ip:203.0.113.7"


def test_forwarded_for_chain_read_right_to_left_to_the_first_untrusted_hop() -> None:
    key_func = client_ip(trusted_proxies=["10.0.0.0/8"])
    # The client may put anything on the left; 10.0.0.2 and 10.0.0.1 are our proxies.
    request = FakeRequest("10.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.1, 10.0.0.2"})
    assert key_func(request) == "ip:198.51.100.1"


def test_every_hop_trusted_gives_the_leftmost() -> None:
    key_func = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert (
        key_func(FakeRequest("10.0.0.1", {"X-Forwarded-For": "10.1.1.1, 10.0.0.2"}))
        == "ip:10.1.1.1"
    )


def test_rfc7239_forwarded_header() -> None:
    key_func = client_ip(trusted_proxies=["10.0.0.0/8"])
    request = FakeRequest(
        "10.0.0.1", {"Forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711"'}
    )
    assert key_func(request) == "ip:2001:db8:cafe::17"


def test_bad_cidr_is_a_config_error() -> None:
    with pytest.raises(qg.ConfigError, match=r"trusted_proxies.*not-a-cidr"):
        client_ip(trusted_proxies=["not-a-cidr"])


def test_limiter_trusted_proxies_apply_to_builtin_key_functions() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    request = FakeRequest("10.0.0.1", {"X-Forwarded-For": "198.51.100.1"})
    assert with_trusted_proxies(api_key_or_ip, trusted)(request) == "ip:198.51.100.1"
    assert with_trusted_proxies(get_remote_address, trusted)(request) == "198.51.100.1"
    assert api_key_or_ip(request) == "ip:10.0.0.1"  # the default itself is unchanged


def test_custom_key_function_results_are_hashed_before_storage() -> None:
    assert storage_id("sk-raw-secret-123") == "key:" + hash_api_key("sk-raw-secret-123")[:20]
    assert storage_id("203.0.113.7") == "ip:203.0.113.7"
    assert storage_id(ClientKey("ip:1.2.3.4")) == "ip:1.2.3.4"


@pytest.mark.parametrize(
    ("secret", "masked"),
    [("sk-live-abcdef123456", "sk-…3456"), ("abcdefghijklmnop", "…mnop"), ("short", "…")],
)
def test_mask_key(secret: str, masked: str) -> None:
    assert mask_key(secret) == masked

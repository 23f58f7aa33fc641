"""Storage keys are built in one place, in the forms running deployments already hold (state on
Redis outlives a restart, so a renamed key would reset every client)."""

from __future__ import annotations

import fnmatch

import pytest

from quotagate.identity import hash_api_key
from quotagate.keys import (
    client_state_key,
    family,
    hash_tagged,
    ip_client_id,
    key_client_id,
    model_limit,
    prefix_problem,
    reset_pattern,
    state_key,
)


def test_client_ids() -> None:
    digest = hash_api_key("sk-alice")
    assert key_client_id(digest) == "key:" + digest[:20]
    assert ip_client_id("203.0.113.7") == "ip:203.0.113.7"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("requests", "{ip:1.2.3.4}:req"),
        ("tokens", "{ip:1.2.3.4}:tok"),
        ("concurrency", "{ip:1.2.3.4}:conc"),
        ("health", "{ip:1.2.3.4}:health"),
        (model_limit("requests", "llama-3-70b"), "{ip:1.2.3.4}:mreq:llama-3-70b"),
        (model_limit("tokens", "a:b"), "{ip:1.2.3.4}:mtok:a:b"),
    ],
)
def test_the_gateway_keys_keep_their_stored_form(name: str, key: str) -> None:
    assert client_state_key("ip:1.2.3.4", name) == key


def test_a_library_counter_name_is_kept_as_it_is() -> None:
    assert state_key("ip:1.2.3.4", "route:/v1/x") == "{ip:1.2.3.4}:route:/v1/x"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("requests", "requests"),
        ("tokens", "tokens"),
        ("concurrency", "concurrency"),
        ("model_requests:m", "requests"),
        ("model_tokens:m:with:colons", "tokens"),
        ("", "requests"),
    ],
)
def test_what_a_limit_counts_comes_from_its_name(name: str, expected: str) -> None:
    assert family(name) == expected


def test_hash_tags() -> None:
    assert hash_tagged("{c}:tok") == "{c}:tok"
    assert hash_tagged("plain") == "{plain}"
    assert hash_tagged("{}x") == "{{}x}"  # an empty tag is no tag


def test_reset_patterns_match_the_prefix_or_one_client_only() -> None:
    keys = ["qg:{key:ab}:req", "qg:{key:ab}:tok:60/m", "qg:{ip:1.2.3.4}:req", "qgx:{key:ab}:req"]
    everyone = reset_pattern("qg:")
    one = reset_pattern("qg:", "key:ab")
    assert [k for k in keys if fnmatch.fnmatchcase(k, everyone)] == keys[:3]
    assert [k for k in keys if fnmatch.fnmatchcase(k, one)] == keys[:2]
    assert reset_pattern("q*[g]:") == "q\\*\\[g\\]:*"  # glob characters are literal


def test_a_braced_prefix_is_named_a_problem() -> None:
    assert prefix_problem("qg") is None
    assert prefix_problem("") is None
    assert prefix_problem("q{g") == "a key prefix cannot hold a hash tag brace, got 'q{g'"

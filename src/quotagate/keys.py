"""Every storage key, built here and never parsed back.

A state key is ``{<client>}:<limit>`` plus the rate's own suffix (``:60/m`` style, added by the
engine): the braces are the Redis Cluster hash tag, so all of one client's limits live in one
slot and a decision touches one slot. The client part is ``key:<hash>`` for an API key (80 bits
of its SHA-256: no secret reaches the storage), ``ip:<address>`` for an anonymous caller, or
what a custom key function produced, made safe by ``identity.storage_id``.

Limits are named by what they count (``requests``, ``tokens``, ``model_requests:<model>``,
``model_tokens:<model>``, ``concurrency``, ``health``): the name travels on the ``Hit`` and comes
back on its ``LimitState``, so headers, metrics and ``/v1/ratelimit`` group by data, not by
picking a storage key apart (Envoy's rate limit service builds its cache keys in one generator
the same way).
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "BUDGET",
    "CONCURRENCY",
    "HEALTH",
    "REQUESTS",
    "TOKENS",
    "Family",
    "client_state_key",
    "family",
    "hash_tagged",
    "ip_client_id",
    "key_client_id",
    "model_limit",
    "prefix_problem",
    "reset_pattern",
    "state_key",
]

REQUESTS = "requests"
TOKENS = "tokens"
CONCURRENCY = "concurrency"
HEALTH = "health"
BUDGET = "budget"

#: What a limit counts, whatever model it is scoped to: requests, tokens, held slots or
#: micro-dollars (a spend budget).
Family = Literal["requests", "tokens", "concurrency", "budget"]

# The short form each name takes in a storage key: the keys of running deployments (state
# outlives a restart on Redis) stay what they were.
_KEY_PARTS = {
    REQUESTS: "req",
    TOKENS: "tok",
    CONCURRENCY: "conc",
    HEALTH: "health",
    BUDGET: "usd",
    "model_requests": "mreq",
    "model_tokens": "mtok",
}
_FAMILIES: dict[str, Family] = {
    REQUESTS: "requests",
    TOKENS: "tokens",
    CONCURRENCY: "concurrency",
    HEALTH: "requests",
    BUDGET: "budget",
    "model_requests": "requests",
    "model_tokens": "tokens",
}


def key_client_id(digest: str) -> str:
    """The client id of an API key, from its hex SHA-256.

    80 bits of the digest: collisions are out of reach for any number of clients a limiter
    sees, and a short id keeps per-client memory small (every state key repeats it).
    """
    return "key:" + digest[:20]


def ip_client_id(address: str) -> str:
    """The client id of an anonymous caller, by its (trusted-proxy resolved) address."""
    return "ip:" + address


def model_limit(family: Literal["requests", "tokens"], model: str) -> str:
    """The name of a per-model limit: ``model_requests:<model>`` or ``model_tokens:<model>``."""
    return f"model_{family}:{model}"


def family(name: str) -> Family:
    """What the limit called ``name`` counts (a name this module's conventions built)."""
    base, _, _ = name.partition(":")
    return _FAMILIES.get(base, "requests")


def state_key(client: str, part: str) -> str:
    """``{<client>}:<part>``: the client's hash tag, then what the limit is (a library
    limit's counter name as it is)."""
    return "{" + client + "}:" + part


def client_state_key(client: str, name: str) -> str:
    """The key of the gateway's limit ``name`` of ``client``: ``{key:ab12}:tok``,
    ``{ip:1.2.3.4}:mreq:<model>``."""
    base, sep, scope = name.partition(":")
    return state_key(client, _KEY_PARTS.get(base, base) + sep + scope)


def hash_tagged(key: str) -> str:
    """``key`` with a Redis Cluster hash tag: kept if it has one, else the whole key braced."""
    start = key.find("{")
    if start != -1 and key.find("}", start + 2) != -1:
        return key
    return "{" + key + "}"


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot start storage keys, or None: a brace would make the prefix part
    of the hash tag (every client in one cluster slot, and keys no reset pattern matches)."""
    if "{" in prefix or "}" in prefix:
        return f"a key prefix cannot hold a hash tag brace, got {prefix!r}"
    return None


def reset_pattern(prefix: str, client: str | None = None) -> str:
    """The SCAN glob matching every key under ``prefix`` (``qg:``), or one client's only."""
    start = prefix if client is None else prefix + "{" + client + "}"
    return re.sub(r"([\\*?\[\]])", r"\\\1", start) + "*"

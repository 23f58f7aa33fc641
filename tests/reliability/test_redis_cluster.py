"""A real 3-master Redis Cluster on loopback behind two gateways (``redis+cluster://``):
multi-instance exactness holds, a decision is one EVALSHA, and a request's keys share one slot
(never CROSSSLOT)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import (
    KEY_LIMITED,
    KEY_PRO,
    Gateway,
    RawAnswer,
    RedisCluster,
    check_request_burst,
    completion_burst,
    config_text,
    gateways,
    http_client,
    ratelimit_of,
    warm,
)

from quotagate.identity import hash_api_key
from quotagate.keys import key_client_id

pytestmark = [pytest.mark.reliability, pytest.mark.redis]

BURST = 200
REQUESTS_PER_MINUTE = 50
#: The slot test sends 50 concurrent requests per instance: it checks key placement, and stays
#: under redis-py's cluster pool of 100 connections per node (see the exactness test above it).
SLOT_BURST = 100

TIERS = f"""
[tiers.limited]
requests = "{REQUESTS_PER_MINUTE}/minute"

# Many limits at once: two request rates, two token rates, per-model limits and a lease, so
# one decision touches seven keys (and the release an eighth operation on the lease set).
# Hour- and day-long periods with room for ten such bursts: the slot test's 100 requests (900
# tokens) leave every state key in Redis for minutes (a GCRA state lives until its bucket is
# full again: 100 x 3.6 s, 900 x 0.36 s, ...), so the keys it lists are all there, however slow
# the machine. At 100000/minute they were gone within milliseconds, and the day-long token
# state (900 x 0.86 ms) within a second: a busy run found fewer keys than it expected.
[tiers.pro]
requests = "1000/hour; 10000/day"
tokens = "10000/hour; 100000/day"
concurrency = 1000
default_max_tokens = 8

[tiers.pro.models."quotagate-mock"]
requests = "1000/hour"
tokens = "10000/hour"

[[keys]]
key = "{KEY_LIMITED}"
tier = "limited"

[[keys]]
key = "{KEY_PRO}"
tier = "pro"
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


def cluster_gateways(
    cluster: RedisCluster, prefix: str, directory: Path, timeout_ms: int = 100
) -> tuple[Gateway, ...]:
    config = config_text(TIERS, storage_url=cluster.url, prefix=prefix, timeout_ms=timeout_ms)
    return Gateway(config, directory, name="a"), Gateway(config, directory, name="b")


def crc16_slot(key: str) -> int:
    """Redis Cluster's slot of a key (CRC16/XMODEM of its hash tag, mod 16384)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def test_crc16_slot_matches_redis(cluster: RedisCluster) -> None:
    """The slot function the next tests rely on agrees with Redis itself."""
    for key in ("qg:{key:abc}:req", "plain", "{user1000}.following", "a{}b"):
        expected = int(cluster.cli(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key))
        assert crc16_slot(key) == expected, key


async def cluster_burst(
    instances: tuple[Gateway, ...], cluster: RedisCluster
) -> tuple[list[RawAnswer | str], float, int, list[str], list[str]]:
    """BURST requests of KEY_LIMITED over ``instances``: (answers, seconds, EVALSHA calls,
    storage modes after, warnings logged)."""
    await warm(*instances)
    evalsha_before = cluster.command_calls("evalsha")
    bodies = [{"prompt": "x", "max_tokens": 4}] * BURST
    answers, span = await completion_burst(instances, KEY_LIMITED, bodies)
    evalsha = cluster.command_calls("evalsha") - evalsha_before
    async with http_client() as client:
        modes = [(await client.get(f"{g.url}/health")).json()["storage"] for g in instances]
    warnings = [line for g in instances for line in g.output().splitlines() if "WARN" in line]
    return answers, span, evalsha, modes, warnings


def admitted_count(answers: list[RawAnswer | str]) -> int:
    return sum(1 for a in answers if isinstance(a, RawAnswer) and a.status == 200)


async def test_two_instances_on_a_cluster_admit_exactly_the_request_limit_in_one_call_each(
    tmp_path: Path, cluster: RedisCluster, key_prefix: str, figures: dict[str, Any]
) -> None:
    # A 1 s call timeout: with the default 100 ms, the cluster client's cold pool (a new
    # connection and its handshake per concurrent call) timed out in 1 run of 4 here under
    # this burst on two cores and tripped the fallback (see RELIABILITY.md).
    two = cluster_gateways(cluster, key_prefix, tmp_path, timeout_ms=1000)
    with gateways(*two) as instances:
        answers, span, evalsha, modes, warnings = await cluster_burst(instances, cluster)
    admitted = admitted_count(answers)
    figures.update(
        burst=BURST,
        admitted=admitted,
        rejected_429=BURST - admitted,
        evalsha_calls=evalsha,
        fallback_warnings=len(warnings),
        burst_seconds=round(span, 3),
    )
    assert not warnings
    assert modes == ["redis", "redis"], "decided on the cluster, never in fallback memory"
    check_request_burst(answers, span, REQUESTS_PER_MINUTE)
    # One round trip per decision: one EVALSHA per request, admitted or not, over all nodes.
    assert evalsha == BURST


async def test_a_burst_above_the_cluster_pool_size_stays_on_the_cluster(
    tmp_path: Path, cluster: RedisCluster, key_prefix: str, figures: dict[str, Any]
) -> None:
    """The same 200 requests to ONE instance. redis-py's cluster client raises
    MaxConnectionsError (it does not queue) past its pool size; one client's keys are on one
    node, so a burst of one client tripped the fallback and the limit stopped being shared
    (found by this suite: RELIABILITY.md, finding 1)."""
    one = cluster_gateways(cluster, key_prefix, tmp_path, timeout_ms=1000)[:1]
    with gateways(*one) as instances:
        answers, span, evalsha, modes, warnings = await cluster_burst(instances, cluster)
    admitted = admitted_count(answers)
    figures.update(
        burst=BURST,
        admitted=admitted,
        rejected_429=BURST - admitted,
        evalsha_calls=evalsha,
        fallback_warnings=len(warnings),
        storage_mode_after=modes[0],
    )
    assert not warnings, warnings
    assert modes == ["redis"]
    check_request_burst(answers, span, REQUESTS_PER_MINUTE)


async def test_a_request_with_seven_limits_and_a_lease_touches_one_slot_never_crossslot(
    tmp_path: Path, cluster: RedisCluster, key_prefix: str, figures: dict[str, Any]
) -> None:
    crossslot_before = cluster.error_count("CROSSSLOT")
    # A 1 s call timeout: this test is about key placement. With the default 100 ms, the
    # cluster client's cold pool (one new connection, with its handshake, per concurrent call)
    # can time out under a burst on two cores and trip the fallback (see RELIABILITY.md).
    instances_ = cluster_gateways(cluster, key_prefix, tmp_path, timeout_ms=1000)
    with gateways(*instances_) as instances:
        await warm(*instances)
        evalsha_before = cluster.command_calls("evalsha")
        zrem_before = cluster.command_calls("zrem")
        # Usage equals the reservation (prompt 1 + 8 generated = the 8-token cap), so no
        # settlement call: a request is its decision plus the release of its lease.
        bodies = [{"model": "quotagate-mock", "prompt": "x", "max_tokens": 8}] * SLOT_BURST
        answers, _ = await completion_burst(instances, KEY_PRO, bodies)
        evalsha = cluster.command_calls("evalsha") - evalsha_before
        zrem = cluster.command_calls("zrem") - zrem_before
        async with http_client() as client:
            modes = [(await client.get(f"{g.url}/health")).json()["storage"] for g in instances]
            state = await ratelimit_of(client, instances[0].url, KEY_PRO)
        placed = cluster.keys_by_node(f"{key_prefix}:*")
        outages = sum(g.count("shared storage unavailable") for g in instances)
        errors = sum(g.count("ERROR") for g in instances)
        warnings = [line for g in instances for line in g.output().splitlines() if "WARN" in line]
    statuses = [a.status if isinstance(a, RawAnswer) else a for a in answers]
    assert statuses == [200] * SLOT_BURST, [s for s in statuses if s != 200][:3]
    assert all(json.loads(a.body)["usage"]["total_tokens"] == 9 for a in answers)  # type: ignore[union-attr]
    assert cluster.error_count("CROSSSLOT") == crossslot_before
    assert modes == ["redis", "redis"], warnings
    assert outages == 0
    assert errors == 0
    assert evalsha == SLOT_BURST
    assert zrem == SLOT_BURST
    assert state["concurrency"]["remaining"] == 1000, "every lease released"

    # Every key of the client (any key naming it, tagged or not) lives in the slot of its hash
    # tag, on one node. (Other clients' keys under the prefix, such as /health's by address,
    # are not the client's.)
    client = key_client_id(hash_api_key(KEY_PRO))
    keys = [k for ks in placed.values() for k in ks if client in k]
    nodes_with_keys = {port for port, ks in placed.items() if any(client in k for k in ks)}
    slots = {crc16_slot(k) for k in keys}
    figures.update(
        requests=SLOT_BURST,
        limits_per_decision=7,
        evalsha_calls=evalsha,
        zrem_calls=zrem,
        crossslot_errors=0,
        state_keys=len(keys),
        slots_used=len(slots),
        nodes_used=len(nodes_with_keys),
    )
    # All six rate states are there (the emptied lease set may be gone), in the tag's slot.
    assert len(keys) >= 6, keys
    assert slots == {crc16_slot("{" + client + "}")}
    assert len(slots) == 1
    assert len(nodes_with_keys) == 1


async def test_reset_on_a_cluster_deletes_the_prefix_on_every_node(
    cluster: RedisCluster, key_prefix: str
) -> None:
    """Clients hash to slots on all three masters: reset scans each node and unlinks across
    slots; afterwards no node holds a key of the prefix."""
    import quotagate as qg

    storage = qg.RedisStorage(cluster.url, prefix=key_prefix)
    async with storage:
        limiter = qg.RateLimiter(storage, overlimit_cache=False)
        clients = [f"client-{i}" for i in range(300)]
        for client in clients:
            await limiter.hit(client, "5/day")
        per_node = [
            int(
                cluster.cli(node.port, "eval", f"return #redis.call('keys', '{key_prefix}:*')", "0")
            )
            for node in cluster.nodes
        ]
        assert all(per_node), per_node  # the keys really are spread over every master
        assert await limiter.reset() == len(clients)
        left = [
            int(
                cluster.cli(node.port, "eval", f"return #redis.call('keys', '{key_prefix}:*')", "0")
            )
            for node in cluster.nodes
        ]
        assert left == [0, 0, 0]
        assert (await limiter.hit("client-0", "5/day")).remaining == 4

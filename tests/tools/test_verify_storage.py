"""``quotagate verify`` reaches Redis through the configured storage: the ``[storage]`` prefix
bounds what ``--restart`` resets, and ``timeout_ms`` is the timeout of every connection verify
opens (issue 11: both were ignored, and the reset was a FLUSHDB of the whole database)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from tools_support import cli, write_config

from quotagate.storage.redis import RedisStorage
from support import RedisServer

ALICE, BOB = "sk-free-alice-0001", "sk-free-bob-0002"


def _database(server: RedisServer) -> str:
    """A database of this module's own: on a FLUSHDB (the defect) other tests' keys survive."""
    return server.url.removesuffix("/0") + "/8"


@pytest.mark.redis
def test_restart_resets_only_the_keys_under_the_configured_prefix(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = _database(redis_server)
    client = redis.Redis.from_url(url)
    client.flushdb()  # this module's database, emptied before the test, not by verify
    stale = "custom:{key:stale}:requests"
    outside = {"other:x": b"1", "qg:{key:stale}:requests": b"2", "customer:x": b"3"}
    client.set(stale, "9")
    for key, value in outside.items():
        client.set(key, value)
    config = write_config(tmp_path, url, "custom")
    try:
        result = cli("verify", "--config", str(config), "--key", ALICE, "--key", BOB, "--restart")
        assert result.exit_code == 0, result.output
        for key, value in outside.items():
            assert client.get(key) == value, key
        assert client.get(stale) is None  # reset with the rest of the prefix
        assert "under prefix 'custom:' at redis://" in result.stdout
        assert "FLUSHDB" not in result.output
        # What verify's last request counted is under the prefix, nowhere else.
        kept = {key.decode() for key in client.scan_iter()}
        assert kept - set(outside)
        assert all(key.startswith("custom:") for key in kept - set(outside))
    finally:
        client.flushdb()
        client.close()


@pytest.mark.redis
def test_every_connection_verify_opens_has_the_configured_timeout_and_prefix(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # verify runs in this process (the gateway it starts does not): every RedisStorage it
    # starts is seen here, with the timeout and prefix it was built with.
    opened: list[tuple[float, str]] = []
    start = RedisStorage.start

    async def recording_start(self: RedisStorage) -> None:
        opened.append((self.timeout, self.prefix))
        await start(self)

    monkeypatch.setattr(RedisStorage, "start", recording_start)
    config = write_config(tmp_path, _database(redis_server), key_prefix, "timeout_ms = 1500")
    result = cli("verify", "--config", str(config), "--key", ALICE, "--key", BOB, "--restart")
    assert result.exit_code == 0, result.output
    assert opened  # the Redis version for the starting state, the reset
    assert set(opened) == {(1.5, f"{key_prefix}:")}


def test_restart_without_a_prefix_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # Without a prefix the reset would be the whole database: refused, as `quotagate reset`
    # refuses it, before a gateway is started (nothing listens at that port).
    config = write_config(tmp_path, "redis://127.0.0.1:1/0", "")
    result = cli("verify", "--config", str(config), "--restart")
    assert result.exit_code == 2, result.output
    assert "starting state" not in result.stdout
    assert result.stderr.startswith("Error: --restart: [storage] prefix is empty")

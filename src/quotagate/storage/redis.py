"""Redis storage: every decision is ONE EVALSHA of ``lua/decide.lua``, timed by Redis ``TIME``.

Decisions go through one auto-pipelined connection (``pipeline.py``): a lone caller's EVALSHA is
written at once; concurrent callers' are coalesced into one write and share round trips. On
Redis Cluster, redis-py's cluster client routes each EVALSHA to its slot's node.

Keys look like ``qg:{<client>}:60s``: the ``{...}`` hash tag puts one client's keys in one
Redis Cluster slot, so a decision touches one slot. Only this module imports ``redis``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, WatchError

from .._types import Clock
from ..decision import Lease
from ..errors import ConfigError, RecordConflict, StorageError
from ..keys import prefix_problem, reset_pattern
from .base import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_MS,
    REDIS_CLUSTER_SCHEMES,
    REDIS_SCHEMES,
    Args,
    StorageMode,
    mask_url,
)
from .pipeline import PipelinedConnection, pack_command

__all__ = ["RedisRecords", "RedisStorage", "load_script"]

_RESET_BATCH = 500  # keys per SCAN page and per UNLINK

logger = logging.getLogger("quotagate")


def load_script(name: str) -> str:
    """Text of a packaged Lua script (``decide`` or ``adjust``), with the parts it shares
    with the other in place of its ``--@include <part>`` lines (one EVAL has no imports)."""
    text = resources.files("quotagate.storage").joinpath(f"lua/{name}.lua").read_text("utf-8")
    return re.sub(
        r"^--@include (\w+)\n", lambda found: load_script(found[1]), text, flags=re.MULTILINE
    )


class RedisStorage:
    """Limit state in Redis (7+, or Valkey), shared by every instance that points at it.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS), ``unix://``,
            ``valkey(s)://``, or ``redis+cluster://host:port`` for Redis Cluster (``SCHEMES``).
        prefix: first part of every key.
        timeout: seconds one call may take before it fails with ``StorageError``.
        client: an existing ``redis.asyncio`` client to use instead of ``url`` (not closed by us).
        clock: decide by this clock instead of Redis ``TIME``: for tests with a fake clock only
            (every instance must then share the clock; keys get no expiry).
    """

    #: URL schemes that name this storage (declared in ``base.py``: reading them must not
    #: import redis-py).
    SCHEMES: ClassVar[tuple[str, ...]] = REDIS_SCHEMES

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
        max_connections: int = 64,
        client: aioredis.Redis | RedisCluster | None = None,
        clock: Clock | None = None,
    ) -> None:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise ConfigError(problem)
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive seconds, got {timeout!r}")
        self.url = url
        self.prefix = prefix + ":" if prefix else ""
        self.timeout = timeout
        self.max_connections = max_connections
        self.server_version: str | None = None
        self.clock = clock
        self._client = client
        self._owns_client = client is None
        self._decide_lua = load_script("decide")
        self._adjust_lua = load_script("adjust")
        self._shas = {
            "decide": hashlib.sha1(self._decide_lua.encode()).hexdigest(),
            "adjust": hashlib.sha1(self._adjust_lua.encode()).hexdigest(),
        }
        self._pipe: PipelinedConnection | None = None
        self._cluster_slots = asyncio.Semaphore(max_connections)

    @property
    def mode(self) -> StorageMode:
        return "redis"

    @property
    def cluster(self) -> bool:
        """Whether this is a Redis Cluster (a call's keys must then share one slot)."""
        return isinstance(self._client, RedisCluster)

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise StorageError("RedisStorage is not started: call `await storage.start()`")
        return self._client

    async def start(self) -> None:
        """Connect, check the server answers, and load the scripts."""
        if self._client is None:
            self._client = _client_from_url(self.url, self.timeout, self.max_connections)
            if self._owns_client and not isinstance(self._client, RedisCluster):
                self._pipe = PipelinedConnection(_redis_scheme(self.url), self.timeout)
        try:
            async with asyncio.timeout(max(self.timeout, 2.0)):
                info = await self._client.info("server")
                if info and not any(k.endswith("_version") for k in info):
                    info = next(iter(info.values()))  # a cluster client may answer per node
                self.server_version = str(
                    info.get("valkey_version") or info.get("redis_version") or "unknown"
                )
                await self._load_scripts()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"cannot reach Redis at {mask_url(self.url)}: {exc}") from exc

    async def aclose(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> RedisStorage:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def ping(self) -> None:
        """Raise StorageError unless Redis answers within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"Redis did not answer PING: {exc!r}") from exc

    def redis_key(self, key: str) -> str:
        return self.prefix + key

    async def decide(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        return await self._call("decide", keys, args, now_us)

    async def adjust(self, keys: Sequence[str], args: Args, now_us: int | None = None) -> list[int]:
        return await self._call("adjust", keys, args, now_us)

    async def release(self, lease: Lease) -> None:
        key = self.redis_key(lease.key)
        try:
            if self._pipe is not None:  # the same connection as decisions: no pool to exhaust
                await self._pipe.call(pack_command(["ZREM", key, lease.id]))
                return
            async with self._cluster_slots, asyncio.timeout(self.timeout):
                await self.client.zrem(key, lease.id)
        except (RedisError, OSError, TimeoutError, hiredis.ReplyError) as exc:
            raise StorageError(f"Redis release failed: {exc!r}") from exc

    async def read_tallies(self, keys: Sequence[str]) -> list[dict[str, int]]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.prefix + key)
                replies = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"Redis read of usage failed: {exc!r}") from exc
        return [{_text(f): int(v) for f, v in reply.items()} for reply in replies]

    async def reset(self, client: str | None = None) -> int:
        """Delete every key under this storage's prefix, for every instance that shares it;
        with ``client`` (``key:<hash>``, ``ip:<address>``: what goes in a key's hash tag), only
        that client's keys.

        SCAN and UNLINK in batches (every node of a cluster): never KEYS or FLUSHDB, and
        nothing outside the prefix is touched, so it needs one.
        """
        if not self.prefix:
            raise ConfigError("reset needs a key prefix: without one it would empty the database")
        pattern = reset_pattern(self.prefix, client)
        deleted = 0
        batch: list[Any] = []
        try:
            async for key in self.client.scan_iter(match=pattern, count=_RESET_BATCH):
                if _RECORDS.search(_text(key)):
                    continue  # usage and issued keys are records, not counters
                batch.append(key)
                if len(batch) >= _RESET_BATCH:
                    deleted += await self.client.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += await self.client.unlink(*batch)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"Redis reset failed after {deleted} keys: {exc!r}") from exc
        return deleted

    async def _call(
        self, script: str, keys: Sequence[str], args: Args, now_us: int | None
    ) -> list[int]:
        if now_us is None and self.clock is not None:
            now_us = round(self.clock() * 1_000_000)
        prefix = self.prefix
        full_keys = [prefix + key for key in keys]
        argv: list[Any] = ["" if now_us is None else now_us, *args]
        pipe = self._pipe
        if pipe is not None:
            packed = pack_command(
                ["EVALSHA", self._shas[script], len(full_keys), *full_keys, *argv]
            )
            try:
                try:
                    reply = await pipe.call(packed)
                except hiredis.ReplyError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    # Redis restarted or SCRIPT FLUSH: load again and resend.
                    await self._load_scripts()
                    reply = await pipe.call(packed)
            except (hiredis.ReplyError, RedisError, OSError) as exc:
                raise StorageError(f"Redis script failed: {exc!r}") from exc
            return reply  # type: ignore[no-any-return]
        return await self._call_client(script, full_keys, argv)

    async def _call_client(self, script: str, keys: list[str], argv: list[Any]) -> list[int]:
        """Through redis-py (Redis Cluster: it routes by the keys' slot). Cluster pipelines
        refuse EVALSHA, so concurrent decisions go as concurrent calls."""
        client = self.client
        sha = self._shas[script]
        try:
            # redis-py's cluster pools raise rather than wait when all their connections are in
            # use: keep concurrent calls below the pool size instead.
            async with self._cluster_slots, asyncio.timeout(self.timeout):
                try:
                    reply = await client.evalsha(sha, len(keys), *keys, *argv)
                except NoScriptError:
                    await self._load_scripts()
                    reply = await client.evalsha(sha, len(keys), *keys, *argv)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"Redis call failed: {exc!r}") from exc
        return reply  # type: ignore[no-any-return]

    async def _load_scripts(self) -> None:
        client = self.client
        for lua, sha in (
            (self._decide_lua, self._shas["decide"]),
            (self._adjust_lua, self._shas["adjust"]),
        ):
            if isinstance(client, RedisCluster):
                await client.script_load(lua)  # the cluster client loads it on every primary
            else:
                loaded = await client.script_load(lua)
                if loaded != sha:
                    raise StorageError(
                        f"Redis returned SHA {loaded} for a script expected as {sha}"
                    )


def _redis_scheme(url: str) -> str:
    """``valkey://`` and ``valkeys://`` are Redis URLs under another name."""
    return url.replace("valkey", "redis", 1) if url.startswith("valkey") else url


def _client_from_url(
    url: str, timeout: float, max_connections: int
) -> aioredis.Redis | RedisCluster:
    """Build the redis-py client; quotagate's own settings fail fast (no driver retries)."""
    parts = urlsplit(url)
    common: dict[str, Any] = {
        "socket_timeout": max(timeout, 0.05) * 10,
        "socket_connect_timeout": max(timeout, 0.05) * 10,
        "retry": Retry(NoBackoff(), 0),
    }
    if parts.scheme in REDIS_CLUSTER_SCHEMES:
        scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
        return RedisCluster.from_url(
            urlunsplit(parts._replace(scheme=scheme)), max_connections=max_connections * 2, **common
        )
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"unsupported storage URL scheme {parts.scheme!r} in {mask_url(url)}")
    return aioredis.Redis.from_url(
        _redis_scheme(urlunsplit(parts)), max_connections=max_connections, **common
    )


_M = TypeVar("_M", bound=Callable[..., Awaitable[Any]])


def _storage_errors(method: _M) -> _M:
    """A Redis failure of a records call as a StorageError (the callers' one error type)."""

    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"Redis records call failed: {exc!r}") from exc

    return call  # type: ignore[return-value]


class RedisRecords:
    """Records of one kind kept beside the counters (the gateway's issued keys): ``name``'s
    hash of id -> text, an index of lookup value -> id, a hash of id -> last use, and a
    version bumped by every change, written in one transaction. One hash tag, one slot."""

    def __init__(self, storage: RedisStorage, name: str) -> None:
        self._storage = storage
        base = storage.prefix + "{" + name + "}:"
        self._records, self._index = base + "records", base + "index"
        self._used, self._version = base + "used", base + "version"

    @_storage_errors
    async def version(self) -> int:
        return int(await self._storage.client.get(self._version) or 0)

    @_storage_errors
    async def load(self) -> tuple[int, list[str]]:
        async with self._storage.client.pipeline(transaction=True) as pipe:
            pipe.get(self._version)
            pipe.hvals(self._records)
            version, texts = await pipe.execute()
        return int(version or 0), [_text(text) for text in texts]

    @_storage_errors
    async def get(self, record_id: str) -> str | None:
        text = await self._storage.client.hget(self._records, record_id)
        return _text(text) if text else None

    @_storage_errors
    async def find(self, value: str) -> str | None:
        record_id = await self._storage.client.hget(self._index, value)
        return await self.get(_text(record_id)) if record_id else None

    @_storage_errors
    async def save(
        self,
        record_id: str,
        text: str,
        values: Sequence[str],
        dropped: Sequence[str],
        previous: str | None = None,
    ) -> None:
        """Write a record (its index ``values`` pointing at it, ``dropped`` ones unmapped),
        only if it is still ``previous`` (the text the change was made from; None: a new
        one): else RecordConflict. WATCH, then one MULTI."""
        async with self._storage.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self._records)
            current = await pipe.hget(self._records, record_id)
            if (_text(current) if current else None) != previous:
                raise RecordConflict(f"record {record_id} changed meanwhile")
            pipe.multi()  # type: ignore[no-untyped-call]
            if dropped:
                pipe.hdel(self._index, *dropped)
            pipe.hset(self._records, record_id, text)
            pipe.hset(self._index, mapping=dict.fromkeys(values, record_id))
            pipe.incr(self._version)
            try:
                await pipe.execute()
            except WatchError as exc:
                raise RecordConflict(f"record {record_id} changed meanwhile") from exc

    @_storage_errors
    async def touch(self, used: dict[str, float]) -> None:
        if used:
            mapping = {k: repr(v) for k, v in used.items()}
            await self._storage.client.hset(self._used, mapping=mapping)  # type: ignore[arg-type]

    @_storage_errors
    async def last_used(self) -> dict[str, float]:
        raw = await self._storage.client.hgetall(self._used)
        return {_text(k): float(v) for k, v in raw.items()}


#: Keys ``reset`` leaves alone: the usage ledger's hashes and the issued keys' records.
_RECORDS = re.compile(r":usage:|\{tenants\}:")  # RedisRecords(storage, "tenants")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

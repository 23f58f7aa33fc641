"""API keys issued at run time (the admin API), shared by every replica through the storage.

A key is a record, ``ApiKey``, stored by its id with the SHA-256 of its secret (never the
secret). ``KeyStore`` keeps the records where the gateway keeps its counters: one Redis hash of
records, one of digest -> id, and a version number bumped by every change, in one transaction;
process memory without Redis (one instance only). ``Tenants`` is one replica's view: the
whole table in memory, so a known key costs a dict lookup and no storage call, refreshed when
the version moved (one GET every ``refresh_s``, 0.25 s): a created, changed, rotated or revoked
key takes effect on every replica within a second. A digest the table does not know is looked
up in the store before it is refused (a key created on another replica works at once); a miss
is remembered for ``refresh_s`` so that bad keys cannot make every request a storage call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import RecordConflict, StorageError
from ..storage import FallbackStorage, Storage

if TYPE_CHECKING:
    from ..storage.redis import RedisStorage

__all__ = [
    "ApiKey",
    "KeyState",
    "KeyStore",
    "MemoryKeyStore",
    "RedisKeyStore",
    "Tenants",
    "key_store",
    "new_key_id",
    "new_secret",
]

logger = logging.getLogger("quotagate")

KeyState = Literal["ok", "revoked", "expired"]

#: Most unknown digests remembered between refreshes (each costs one store lookup).
_MISSES = 10_000


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(32)


@dataclass(slots=True)
class ApiKey:
    """One key. Times are epoch seconds; ``previous`` holds the digests a rotation replaced,
    each with the time its grace ends."""

    id: str
    digest: str
    tier: str
    masked: str
    created_at: float
    name: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    models: list[str] | None = None
    previous: list[tuple[str, float]] = field(default_factory=list)
    rev: int = 0
    source: Literal["api", "config"] = "api"

    def state(self, digest: str, now: float) -> KeyState:
        """Whether the secret of ``digest`` opens this key at ``now``."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if digest == self.digest:
            return "ok"
        return "ok" if any(d == digest and now < until for d, until in self.previous) else "revoked"

    def valid_until(self, digest: str) -> float:
        """When ``state(digest, ...)`` stops being what it is now at the latest: the key's
        expiry, its revocation, the end of an old secret's grace."""
        grace = next((until for d, until in self.previous if d == digest), math.inf)
        return min(self.expires_at or math.inf, self.revoked_at or math.inf, grace)

    def digests(self) -> list[str]:
        return [self.digest, *(d for d, _ in self.previous)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiKey:
        data = json.loads(text)
        data["previous"] = [tuple(item) for item in data.get("previous", [])]
        return cls(**data)


class KeyStore(Protocol):
    """Where the records live; every write bumps the version readers poll."""

    async def version(self) -> int: ...

    async def load(self) -> tuple[int, list[ApiKey]]: ...

    async def find(self, digest: str) -> ApiKey | None: ...

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def save(
        self, key: ApiKey, dropped: tuple[str, ...] = (), previous: str | None = None
    ) -> None:
        """Store ``key`` and map each of its digests to it; unmap ``dropped`` digests. Only
        if the stored record is still ``previous`` (its JSON when read; None: a new key):
        else RecordConflict, so two changes made at once cannot lose one."""
        ...

    async def touch(self, used: dict[str, float]) -> None:
        """Record when keys were last used (not a change: no version bump)."""
        ...

    async def last_used(self) -> dict[str, float]: ...


class MemoryKeyStore:
    """The records in this process: the admin API of a single instance."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        self._used: dict[str, float] = {}
        self._version = 0

    async def version(self) -> int:
        return self._version

    async def load(self) -> tuple[int, list[ApiKey]]:
        return self._version, [ApiKey.from_json(text) for text in self._keys.values()]

    async def find(self, digest: str) -> ApiKey | None:
        key_id = self._digests.get(digest)
        return await self.get(key_id) if key_id else None

    async def get(self, key_id: str) -> ApiKey | None:
        text = self._keys.get(key_id)
        return ApiKey.from_json(text) if text else None

    async def save(
        self, key: ApiKey, dropped: tuple[str, ...] = (), previous: str | None = None
    ) -> None:
        if self._keys.get(key.id) != previous:
            raise RecordConflict(f"key {key.id} changed meanwhile")
        for digest in dropped:
            self._digests.pop(digest, None)
        self._keys[key.id] = key.to_json()
        for digest in key.digests():
            self._digests[digest] = key.id
        self._version += 1

    async def touch(self, used: dict[str, float]) -> None:
        self._used.update(used)

    async def last_used(self) -> dict[str, float]:
        return dict(self._used)


class RedisKeyStore:
    """The records in Redis, beside the counters (``RedisRecords``: one transaction a change,
    one hash tag)."""

    def __init__(self, storage: RedisStorage) -> None:
        from ..storage.redis import RedisRecords  # redis-py only when Redis is configured

        self._records = RedisRecords(storage, "tenants")

    async def version(self) -> int:
        return await self._records.version()

    async def load(self) -> tuple[int, list[ApiKey]]:
        version, texts = await self._records.load()
        return version, [ApiKey.from_json(text) for text in texts]

    async def find(self, digest: str) -> ApiKey | None:
        text = await self._records.find(digest)
        return ApiKey.from_json(text) if text else None

    async def get(self, key_id: str) -> ApiKey | None:
        text = await self._records.get(key_id)
        return ApiKey.from_json(text) if text else None

    async def save(
        self, key: ApiKey, dropped: tuple[str, ...] = (), previous: str | None = None
    ) -> None:
        await self._records.save(key.id, key.to_json(), key.digests(), dropped, previous)

    async def touch(self, used: dict[str, float]) -> None:
        await self._records.touch(used)

    async def last_used(self) -> dict[str, float]:
        return await self._records.last_used()


def key_store(storage: Storage) -> KeyStore:
    """The key store beside the counters: Redis when they are in Redis (a started storage)."""
    primary = storage.primary if isinstance(storage, FallbackStorage) else storage
    if primary.mode == "redis":  # then redis-py is loaded already
        from ..storage.redis import RedisStorage

        if isinstance(primary, RedisStorage):
            return RedisKeyStore(primary)
    return MemoryKeyStore()


class Tenants:
    """One replica's view of the issued keys (see the module docstring)."""

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Callable[[], float] = time.time,
        refresh_s: float = 0.25,
        touch_s: float = 10.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.refresh_s = refresh_s
        self.touch_s = touch_s
        self.version = -1
        self.generation = 0  # bumped by every change of this table (a memo of it is stale)
        self._by_digest: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._misses: dict[str, float] = {}  # digest -> when the store last said "unknown"
        self._used: dict[str, float] = {}  # id -> last use, not yet written
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the storage is down: the poll loads the table when it is back
            logger.warning("quotagate: issued keys not loaded yet: %s", exc)
        self._task = asyncio.create_task(self._poll(), name="quotagate-tenants")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()

    def lookup(self, digest: str) -> ApiKey | None:
        """The key a secret's digest opens, from the table (no storage call)."""
        return self._by_digest.get(digest)

    async def find(self, digest: str) -> ApiKey | None:
        """``lookup``, then the store for a digest the table does not know yet."""
        key = self._by_digest.get(digest)
        if key is not None:
            return key
        now = self.clock()
        missed = self._misses.get(digest)
        if missed is not None and now - missed < self.refresh_s:
            return None
        try:
            key = await self.store.find(digest)
        except StorageError as exc:  # the store is down: only the keys already known are served
            logger.debug("quotagate: key lookup failed: %s", exc)
            return None
        if key is None:
            if len(self._misses) >= _MISSES:
                self._misses.clear()
            self._misses[digest] = now
            return None
        self._index(key)
        return key

    def used(self, key_id: str) -> None:
        self._used[key_id] = self.clock()

    async def refresh(self) -> bool:
        """Load the table again if the store's version moved; returns whether it did."""
        version = await self.store.version()
        if version == self.version:
            return False
        version, keys = await self.store.load()
        self._by_digest, self._by_id = {}, {}
        for key in keys:
            self._index(key)
        self._misses.clear()
        self.version = version
        self.generation += 1
        return True

    def _index(self, key: ApiKey) -> None:
        self.generation += 1
        old = self._by_id.get(key.id)
        if old is not None:
            for digest in old.digests():
                self._by_digest.pop(digest, None)
        self._by_id[key.id] = key
        for digest in key.digests():
            self._by_digest[digest] = key

    async def _poll(self) -> None:
        flushed = self.clock()
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                if self.clock() - flushed >= self.touch_s:
                    flushed = self.clock()
                    await self._flush()
            except Exception as exc:  # the storage is down: keep serving from the table
                logger.debug("quotagate: key table not refreshed: %s", exc)

    async def _flush(self) -> None:
        used, self._used = self._used, {}
        try:
            await self.store.touch(used)
        except Exception as exc:
            self._used = {**used, **self._used}
            logger.debug("quotagate: last use of keys not written: %s", exc)

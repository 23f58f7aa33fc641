"""Set-up: the config (loaded, and the keys under test added to it when it lacks them), the
gateway under test (the one at ``--url``, or one started here and stopped by pid), and verify's
own access to the configured Redis (through the configured storage, so ``[storage] prefix``
and ``timeout_ms`` hold for verify as for the gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ...errors import ConfigError, StorageError
from ...identity import hash_api_key, mask_key
from .._common import ToolError, mask_password
from .._gateway import GatewayProcess
from .evidence import Client

if TYPE_CHECKING:
    from ...gateway.config import GatewayConfig
    from ...storage import RedisStorage

__all__ = [
    "COMPLETIONS",
    "HEALTH",
    "GatewayUnderTest",
    "KeyInfo",
    "check_url",
    "open_gateway",
    "redis_storage",
    "redis_version",
    "reset_prefix",
    "sha256_file",
]

#: The gateway's paths verify calls (besides /v1/models and /v1/ratelimit, read once).
COMPLETIONS = "/v1/completions"
HEALTH = "/health"


@dataclass(slots=True)
class KeyInfo:
    """An API key under test and its tier."""

    secret: str
    tier: str | None  # as the config says, None when unknown
    added: bool = False  # added to the config of this run only

    @property
    def masked(self) -> str:
        return mask_key(self.secret)


@dataclass(slots=True)
class GatewayUnderTest:
    """The gateway the checks run against, and what verify knows about it."""

    client: Client
    config: GatewayConfig | None  # None for ``--url`` without ``--config``
    config_path: str | None  # None for the embedded default (or no config at all)
    keys: list[KeyInfo]
    process: GatewayProcess | None  # the gateway verify started, None for ``--url``


def check_url(url: str) -> None:
    """Raise ToolError unless ``url`` is an http(s) URL with a host (and a valid port)."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        valid = False
    if not valid:
        raise ToolError(f"--url: expected an http:// or https:// URL (got {mask_password(url)!r})")


def _load_config(path: str | None) -> GatewayConfig:
    from ...gateway.config import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        problems = "; ".join(str(exc).splitlines())
        raise ToolError(f"config {path or 'built-in default'}: {problems}") from None


def _pick_tier(config: GatewayConfig, wanted: str | None) -> str:
    tiers = config.tiers
    if wanted is not None:
        if wanted not in tiers:
            raise ToolError(
                f"--tier: unknown tier, expected one of {sorted(tiers)} (got {wanted!r})"
            )
        if not tiers[wanted].requests:
            raise ToolError(f"--tier {wanted}: it has no request limit to test")
        return wanted
    anonymous = config.anonymous.tier if config.anonymous else None
    limited = [name for name, tier in tiers.items() if tier.requests]
    for name in ["free", *(n for n in limited if n != anonymous), *limited]:
        if name in limited:
            return name
    raise ToolError("the config has no tier with a request limit to test")


def _prepare_config(
    config: GatewayConfig,
    config_path: str | None,
    keys: tuple[str, ...],
    tier: str | None,
    workdir: Path,
) -> tuple[str | None, list[KeyInfo]]:
    """The config file to serve, with the keys under test added to it when it lacks them."""
    from ...gateway.config import DEFAULT_CONFIG

    by_digest = {key.digest: key.tier for key in config.keys}
    secrets_ = list(keys) or [f"sk-verify-{secrets.token_hex(12)}" for _ in range(2)]
    infos = [KeyInfo(s, by_digest.get(hash_api_key(s))) for s in secrets_]
    missing = [info for info in infos if info.tier is None]
    if not missing:
        return config_path, infos
    chosen = _pick_tier(config, tier)
    text = Path(config_path).read_text("utf-8") if config_path else DEFAULT_CONFIG
    blocks = []
    for info in missing:
        info.tier, info.added = chosen, True
        blocks.append(
            f'\n[[keys]]\nsha256 = "{hash_api_key(info.secret)}"\ntier = "{chosen}"\n'
            f'name = "quotagate-verify"\n'
        )
    path = workdir / "gateway.toml"
    path.write_text(text.rstrip() + "\n" + "".join(blocks), "utf-8")
    _load_config(str(path))  # fail here, with the path, rather than in the child
    return str(path), infos


@contextlib.contextmanager
def _client(url: str, timeout: float, started: float) -> Iterator[Client]:
    client = Client(url, timeout, started)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def open_gateway(
    *,
    url: str | None,
    config_path: str | None,
    keys: tuple[str, ...],
    tier: str | None,
    timeout: float,
    started: float,
    restart: bool = False,
) -> Iterator[GatewayUnderTest]:
    """The gateway under test: the one at ``url``, or one started here and stopped by pid.

    Args:
        url: a running gateway, or None to start one on ``config_path``.
        config_path: its config file; None for the embedded default (or, with ``url``, none).
        keys: the two API keys under test; without ``url`` they may be omitted (two
            throwaway keys are then added to the config of this run).
        tier: the tier of keys the config does not list.
        timeout: seconds per request.
        started: ``time.perf_counter()`` when verify started.
        restart: ``--restart`` is asked for: refuse up front what its reset could not do.

    Raises:
        ToolError: the config is invalid, or the gateway did not start.
    """
    if url is not None:
        config = _load_config(config_path) if config_path else None
        known = {key.digest: key.tier for key in config.keys} if config else {}
        infos = [KeyInfo(k, known.get(hash_api_key(k))) for k in keys]
        with _client(url, timeout, started) as client:
            yield GatewayUnderTest(client, config, config_path, infos, None)
        return
    config = _load_config(config_path)
    storage = redis_storage(config) if restart else None
    if storage is not None and not storage.prefix:
        raise ToolError(
            "--restart: [storage] prefix is empty: verify resets the counters under the "
            "prefix, and without one that would be the whole Redis database"
        )
    with tempfile.TemporaryDirectory(prefix="quotagate-verify-") as workdir:
        served, infos = _prepare_config(config, config_path, keys, tier, Path(workdir))
        process = GatewayProcess(served)
        try:
            process.start()
            with _client(process.url, timeout, started) as client:
                yield GatewayUnderTest(client, config, config_path, infos, process)
        finally:
            process.close()


def sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def redis_storage(config: GatewayConfig) -> RedisStorage | None:
    """verify's own connection to the configured Redis, as ``[storage]`` describes it (its
    prefix, its ``timeout_ms``), without the fallback: an outage is reported, not hidden; None
    for memory storage. A new one each call: each is started and closed in an event loop of
    its own.

    Raises:
        ToolError: the storage refuses what the ``[storage]`` table holds.
    """
    from ...gateway.server import redis_of

    try:
        return redis_of(config)
    except ConfigError as exc:
        raise ToolError(f"[storage]: {exc}") from None


def redis_version(storage: RedisStorage) -> str:
    """The server's version, or ``unreachable (...)``."""

    async def version() -> str | None:
        async with storage:
            return storage.server_version

    try:
        return str(asyncio.run(version()))
    except StorageError as exc:
        return f"unreachable ({exc})"


def reset_prefix(storage: RedisStorage, url: str) -> str:
    """Delete the counters under the storage's prefix, as ``quotagate reset`` does (SCAN +
    UNLINK, never FLUSHDB: nothing outside the prefix is touched); returns what was done.

    Raises:
        ToolError: Redis failed, or the prefix is empty.
    """
    from ...gateway.server import describe_storage, reset_counters

    scope = describe_storage(storage, url)
    try:
        deleted = asyncio.run(reset_counters(storage))
    except (StorageError, ConfigError) as exc:
        raise ToolError(f"cannot reset the counters under {scope}: {exc}") from None
    return f"reset: {deleted} keys deleted under {scope}"

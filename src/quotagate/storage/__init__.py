"""Storages: where limit state lives.

``MemoryStorage`` (embedded default, per process), ``RedisStorage`` (shared; one Lua call per
decision) and ``FallbackStorage`` (Redis first, memory while Redis is down). Pick one by URL
with ``storage_from_url``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError
from .base import (
    CALENDAR,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_MS,
    FIXED_WINDOW,
    GCRA,
    REDIS_SCHEMES,
    STORAGE_MODES,
    TALLY,
    Args,
    Storage,
    StorageMode,
    mask_url,
    split_query,
)
from .fallback import FALLBACK_POLICIES, FallbackPolicy, FallbackStorage
from .memory import MemoryStorage

if TYPE_CHECKING:
    from .redis import RedisStorage

__all__ = [
    "CALENDAR",
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_MS",
    "FALLBACK_POLICIES",
    "FIXED_WINDOW",
    "GCRA",
    "SCHEMES",
    "STORAGE_MODES",
    "TALLY",
    "URL_PARAMS",
    "Args",
    "FallbackPolicy",
    "FallbackStorage",
    "MemoryStorage",
    "RedisStorage",
    "Storage",
    "StorageMode",
    "mask_url",
    "scheme_error",
    "storage_from_url",
    "url_scheme",
]

#: Every URL scheme ``storage_from_url`` accepts, each declared on its storage.
SCHEMES: tuple[str, ...] = (*MemoryStorage.SCHEMES, *REDIS_SCHEMES)
#: Query parameters of a storage URL that are quotagate's own (the rest go to redis-py).
URL_PARAMS = ("fallback", "fallback_share", "timeout_ms", "prefix", "max_keys")


def __getattr__(name: str) -> object:
    # RedisStorage is imported on first use so that memory-only users never import redis-py.
    if name == "RedisStorage":
        from .redis import RedisStorage

        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def url_scheme(url: str) -> str:
    """The scheme of a storage URL, lower-cased (``""`` when it has none)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def scheme_error(url: str) -> str | None:
    """What is wrong with the URL's scheme (``expected ... one of memory://, redis://, ...``),
    or None when a storage accepts it."""
    if url_scheme(url) in SCHEMES:
        return None
    return "expected a URL starting with one of " + ", ".join(f"{s}://" for s in SCHEMES)


def storage_from_url(
    url: str = "memory://",
    *,
    fallback: FallbackPolicy | Literal["none"] | None = None,
    fallback_share: float | None = None,
    timeout: float | None = None,
    prefix: str | None = None,
) -> Storage:
    """Build a storage from a URL.

    ``memory://`` (``?max_keys=N``) is process memory. ``redis://``, ``rediss://``, ``unix://``,
    ``valkey(s)://`` and ``redis+cluster://`` (every scheme: ``SCHEMES``) are Redis, wrapped in
    a ``FallbackStorage`` with policy ``memory`` unless ``fallback`` (argument or ``?fallback=``
    query) says ``allow``, ``deny`` or ``none`` (no fallback: outages raise ``StorageError``).
    Other query parameters of ours (``URL_PARAMS``): ``fallback_share``, ``timeout_ms`` and
    ``prefix``; what neither they nor the arguments give is the storage's own default.

    Raises:
        ConfigError: unknown scheme or a bad parameter value; the message names it.
    """
    scheme = url_scheme(url)
    rest, params = split_query(url, URL_PARAMS)
    try:
        if scheme in MemoryStorage.SCHEMES:
            if "max_keys" not in params:
                return MemoryStorage()
            return MemoryStorage(max_keys=_number(params, "max_keys", int))
        problem = scheme_error(url)
        if problem is not None:
            raise ConfigError(f"unsupported storage URL {mask_url(url)!r}: {problem}")
        from .redis import RedisStorage

        # Only what the arguments or the URL give: the storages' own defaults stand otherwise.
        redis_options: dict[str, Any] = {}
        if prefix is not None or "prefix" in params:
            redis_options["prefix"] = prefix if prefix is not None else params["prefix"]
        if timeout is not None:
            redis_options["timeout"] = timeout
        elif "timeout_ms" in params:
            redis_options["timeout"] = _number(params, "timeout_ms", int) / 1000
        fallback_options: dict[str, Any] = {}
        if fallback_share is not None:
            fallback_options["share"] = fallback_share
        elif "fallback_share" in params:
            fallback_options["share"] = _number(params, "fallback_share", float)
    except ValueError as exc:
        raise ConfigError(f"bad storage URL parameter in {mask_url(url)!r}: {exc}") from None
    primary = RedisStorage(rest, **redis_options)
    policy = fallback or params.get("fallback", "memory")
    if policy == "none":
        return primary
    if policy not in FALLBACK_POLICIES:
        choices = ", ".join((*FALLBACK_POLICIES, "none"))
        raise ConfigError(f"fallback must be one of {choices}, got {policy!r}")
    return FallbackStorage(primary, policy=policy, **fallback_options)


def _number(params: dict[str, str], name: str, kind: type[int] | type[float]) -> Any:
    """``params[name]`` as a number, or a ValueError that names the parameter."""
    try:
        return kind(params[name])
    except ValueError:
        raise ValueError(f"{name} must be a number, got {params[name]!r}") from None

"""Running the gateway: logging, the uvicorn options and protocol, workers, counter reset.

``cli.py`` maps flags to these calls, as uvicorn's ``main.py`` maps flags to ``run()``; what a
served process is built from lives here, once, for the command line and for worker processes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from .._types import LogLevel
from ..storage import FallbackStorage, RedisStorage, mask_url
from .config import GatewayConfig, ServerConfig, configured_storage, env_name, load_config

__all__ = [
    "CONFIG_ENV",
    "app_from_env",
    "check_workers",
    "describe_storage",
    "redis_of",
    "reset_counters",
    "run",
    "setup_logging",
    "uvicorn_options",
]

#: The config file a worker process reads again (set by ``run`` for ``--workers N``).
CONFIG_ENV = "QUOTAGATE_CONFIG"

logger = logging.getLogger("quotagate")


def setup_logging(level: LogLevel) -> None:
    """Our logger at ``level`` on stderr, in uvicorn's style."""
    logger.setLevel(level.upper())
    if not any(getattr(h, "_quotagate", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        handler._quotagate = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def redis_of(config: GatewayConfig) -> RedisStorage | None:
    """The configured Redis itself, without its fallback (an outage is then an error, not a
    quiet switch to memory); None for memory storage."""
    storage = configured_storage(config)
    if isinstance(storage, FallbackStorage):
        storage = storage.primary
    return storage if isinstance(storage, RedisStorage) else None


def _http_protocol(server: ServerConfig) -> Any:
    """uvicorn's httptools protocol with bounds on request heads (431 past it) and on the time
    to send a request (408); uvicorn's default when httptools is not installed (h11 bounds
    heads, not time)."""
    try:
        from .protocol import BoundedHttpToolsProtocol
    except ImportError:
        return "auto"
    return functools.partial(
        BoundedHttpToolsProtocol,
        max_header_bytes=server.max_header_bytes,
        request_timeout_s=server.request_timeout_s,
        error_format=server.error_format,
    )


def uvicorn_options(config: GatewayConfig) -> dict[str, Any]:
    """The ``uvicorn.run`` options of a served gateway: socket, bounded protocol, TLS."""
    server = config.server
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "log_level": config.log_level,
        "proxy_headers": False,  # client IPs are resolved by quotagate's trusted_proxies
        "server_header": False,
        "http": _http_protocol(server),
    }
    if server.tls_certfile:  # HTTPS on the gateway's own socket
        options["ssl_certfile"] = server.tls_certfile
        options["ssl_keyfile"] = server.tls_keyfile
    return options


def run(
    config: GatewayConfig,
    *,
    config_path: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    workers: int = 1,
) -> None:
    """Serve the gateway until stopped: in this process, or in ``workers`` processes that each
    read the config again (the path and the flags handed on through the environment)."""
    import uvicorn

    setup_logging(config.log_level)
    options = uvicorn_options(config)
    if workers == 1:
        from .app import create_app

        uvicorn.run(create_app(config, config_path=config_path, overrides=overrides), **options)
        return
    os.environ[CONFIG_ENV] = config_path or ""
    for section, values in (overrides or {}).items():
        for field, value in values.items():
            os.environ[env_name(section, field)] = str(value)
    uvicorn.run("quotagate.gateway.server:app_from_env", factory=True, workers=workers, **options)


def app_from_env() -> FastAPI:
    """App factory for ``quotagate serve --workers N``: each worker reads the config again."""
    from .app import create_app

    path = os.environ.get(CONFIG_ENV) or None
    config = load_config(path)
    setup_logging(config.log_level)
    return create_app(config, config_path=path)


async def reset_counters(storage: RedisStorage, client: str | None = None) -> int:
    """Forget counters under the storage's prefix: every client's, or one client's (the id in
    its keys' hash tag); returns how many keys were deleted."""
    await storage.start()
    try:
        return await storage.reset(client)
    finally:
        await storage.aclose()


def describe_storage(storage: RedisStorage, url: str) -> str:
    """``prefix 'qg' at redis://...`` (password masked): what a reset touches."""
    return f"prefix {storage.prefix!r} at {mask_url(url)}"


def check_workers(config: GatewayConfig, workers: int) -> str | None:
    """The warning for ``--workers N`` on memory storage, or None."""
    if workers > 1 and config.storage.url.startswith("memory"):
        return (
            f"warning: --workers {workers} with memory storage: every worker keeps its own "
            f"counters, so each limit is enforced per process ({workers}x the configured "
            "traffic gets through). Use Redis storage to share limits between workers."
            + (
                " The admin API's keys and usage are per worker too."
                if config.admin is not None
                else ""
            )
        )
    return None

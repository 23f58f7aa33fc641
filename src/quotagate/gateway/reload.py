"""``kill -HUP``: the config file read again, applied only where no restart is needed.

Keys, tiers, anonymous access, the health limit, shadow mode, trusted proxies, the body limit,
the log level and the whole ``[[backends]]`` fleet (see ``fleet``) change at once, for the
requests that follow. What the running process is built on (storage, the single ``[backend]``
table, the listening socket and its bounds) needs a restart: kept, with a warning naming it.
A file that does not validate changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .config import GatewayConfig, load_config

__all__ = ["RESTART_SERVER_FIELDS", "reloaded_config"]

logger = logging.getLogger("quotagate")

#: ``[server]`` fields the listening socket is built with (its own 431 and 408 answers
#: included): a reload cannot change them.
RESTART_SERVER_FIELDS = (
    "error_format",
    "host",
    "port",
    "max_header_bytes",
    "request_timeout_s",
    "cors_allow_origins",
    "tls_certfile",
    "tls_keyfile",
)
#: Sections the process is built on.
_RESTART_SECTIONS = ("storage", "backend")


def reloaded_config(
    path: str, overrides: Mapping[str, Mapping[str, Any]], old: GatewayConfig
) -> GatewayConfig | None:
    """The config to run from now on: the file's, with what needs a restart kept from
    ``old``; None (and an error logged) when the file does not validate."""
    try:
        new = load_config(path, overrides=overrides)
    except ConfigError as exc:
        logger.error("quotagate: %s not reloaded, the running config stays:\n%s", path, exc)
        return None
    kept = [
        f"server.{name}"
        for name in RESTART_SERVER_FIELDS
        if getattr(new.server, name) != getattr(old.server, name)
    ]
    # The single [backend] is built on at start; [[backends]] (or a switch to them) reload.
    restart = [n for n in _RESTART_SECTIONS if n != "backend" or not (new.backends or old.backends)]
    kept += [name for name in restart if getattr(new, name) != getattr(old, name)]
    if kept:
        logger.warning(
            "quotagate: %s changed, which needs a restart: the running value is kept",
            ", ".join(kept),
        )
    server = new.server.model_copy(
        update={name: getattr(old.server, name) for name in RESTART_SERVER_FIELDS}
    )
    return new.model_copy(update={"server": server, **{n: getattr(old, n) for n in restart}})

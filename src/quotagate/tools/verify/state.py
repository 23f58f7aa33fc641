"""The starting state (the tutorial's first step): gathered from the gateway and the config into
the record's ``environment``, then printed from that record alone, so what people read and what
the evidence keeps cannot differ."""

from __future__ import annotations

import platform
import sys
from typing import Any

from ... import __version__
from ...gateway.backends import MOCK_MODEL
from ...storage import mask_url
from .._common import ToolError, mask_password
from .setup import HEALTH, GatewayUnderTest, redis_storage, redis_version, sha256_file

__all__ = ["gather_starting_state", "starting_state_lines"]


def gather_starting_state(gateway: GatewayUnderTest, model: str | None) -> dict[str, Any]:
    """Ask the gateway and the config what is about to be tested: the record's ``environment``.

    Fills in the tier of a key the config does not name from the gateway's ``/v1/ratelimit``.

    Args:
        gateway: the gateway under test.
        model: the model to request; None for the first of ``/v1/models``.

    Raises:
        ToolError: it is not a quotagate gateway, or it refuses a key (401).
    """
    client = gateway.client
    status, health = client.json(HEALTH)
    if status != 200 or not isinstance(health, dict) or "status" not in health:
        raise ToolError(
            f"GET {client.base_url}{HEALTH} answered {status}, not the gateway's "
            f'{{"status": "ok", ...}}: is this a quotagate gateway?'
        )
    status, models = client.json("/v1/models")
    data = models.get("data") if status == 200 and isinstance(models, dict) else None
    listing = [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []
    if model is None:
        listed = listing[0].get("id") if listing else None
        model = listed if isinstance(listed, str) else MOCK_MODEL
    # A fleet lists each model with the backend that serves it: the backend under test.
    serving = next((e.get("owned_by") for e in listing if e.get("id") == model), None)
    for info in gateway.keys:
        status, state = client.json("/v1/ratelimit", info.secret)
        if status == 401:
            error = state.get("error") if isinstance(state, dict) else state
            raise ToolError(f"key {info.masked} was refused by the gateway: 401 {error}")
        if status == 200 and isinstance(state, dict) and info.tier is None:
            info.tier = state.get("tier")

    config = gateway.config
    storage: dict[str, Any] = {"url": None, "mode": health.get("storage")}
    backend: dict[str, Any] = {"kind": None, "url": None}
    config_record: dict[str, Any] = {"path": None, "digest": None, "file_sha256": None}
    health_limit: str | None = None
    if config is not None:
        from ...gateway.config import config_digest

        storage["url"] = mask_url(config.storage.url)
        redis = redis_storage(config)
        if redis is not None:
            storage["redis_version"] = redis_version(redis)
        url = config.backend.url
        backend = {"kind": config.backend.kind, "url": mask_url(url) if url else None}
        if config.backends:  # a fleet: every backend, and the one under test (by --model)
            backend = {
                "kind": "fleet",
                "url": None,
                "under_test": serving,
                "backends": [
                    {
                        "name": b.name,
                        "kind": b.kind,
                        "urls": [mask_url(u) for u in b.urls],
                        "models": b.models,
                        "aliases": b.aliases,
                    }
                    for b in config.backends
                ],
            }
        config_path = gateway.config_path
        config_record = {
            "path": config_path or "built-in default",
            "digest": config_digest(config),
            "file_sha256": sha256_file(config_path) if config_path else None,
        }
        health_limit = config.health.requests
    process = gateway.process
    return {
        "quotagate": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "gateway": {
            "url": mask_password(client.base_url),
            "started_by_verify": process is not None,
            "pid": process.pid if process else None,
            "version": health.get("version"),
            "health": health,
        },
        "config": config_record,
        "storage": storage,
        "backend": backend,
        "model": model,
        "keys": [
            {"key": info.masked, "tier": info.tier, "added_for_this_run": info.added}
            for info in gateway.keys
        ],
        "health_limit": health_limit,
    }


def starting_state_lines(environment: dict[str, Any]) -> list[str]:
    """The starting state for people, from the record's ``environment`` alone."""
    gateway = environment["gateway"]
    where = gateway["url"] + (
        f" (started by verify, pid {gateway['pid']})"
        if gateway["started_by_verify"]
        else " (--url)"
    )
    storage = environment["storage"]
    storage_text = storage["url"] or "unknown (no --config)"
    if "redis_version" in storage:
        storage_text += f" (Redis {storage['redis_version']})"
    storage_text += f" · mode {storage['mode']}"
    if storage["mode"] == "fallback":
        storage_text += " (Redis unreachable: the gateway decides in memory)"
    backend = environment["backend"]
    backend_text = (
        f"{backend['kind']}" + (f" {backend['url']}" if backend["url"] else "")
        if backend["kind"]
        else "unknown (no --config)"
    )
    if backend["kind"] == "fleet":
        names = ", ".join(f"{b['name']} ({b['kind']})" for b in backend["backends"])
        backend_text = f"fleet: {names}; {environment['model']} served by {backend['under_test']}"
    config = environment["config"]
    if config["path"] is None:
        config_text = "unknown (no --config)"
    else:
        config_text = f"{config['path']} (digest {config['digest']})"
    keys_text = ", ".join(
        f"{key['key']} -> tier {key['tier'] or 'unknown'}"
        + (" (added for this run)" if key["added_for_this_run"] else "")
        for key in environment["keys"]
    )
    rows = [
        ("quotagate", f"{environment['quotagate']} (gateway reports {gateway['version']})"),
        ("python", f"{environment['python']} · {environment['python_executable']}"),
        ("config", config_text),
        ("storage", storage_text),
        ("backend", backend_text),
        ("gateway", where),
        ("model", environment["model"]),
        ("keys", keys_text),
    ]
    return [
        "quotagate verify · starting state",
        *(f"  {label:<10} {value}" for label, value in rows),
    ]

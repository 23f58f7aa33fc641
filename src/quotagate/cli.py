"""The ``quotagate`` command: a thin shell over the gateway.

quotagate serve [--config FILE] [--host H] [--port N] [--workers N] [--log-level L]
quotagate check-config FILE
quotagate keys new [--tier T]        quotagate keys hash KEY
quotagate keys create|list|show|update|revoke|rotate --url URL   (the admin API)
quotagate mock [--port N]            (the mock model alone, as a stand-in model server)
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import click

from . import __version__
from ._types import LOG_LEVELS
from .errors import ConfigError, StorageError
from .identity import hash_api_key

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quotagate")
def main() -> None:
    """quotagate: rate limiting for AI (LLM inference) APIs."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--host", help="Interface to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8000).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Default: info.")
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    workers: int,
    log_level: str | None,
) -> None:
    """Run the OpenAI-compatible rate-limiting gateway."""
    from .gateway import server
    from .gateway.config import DEV_KEY, is_loopback, load_config

    overrides = _flag_overrides(host, port, log_level)
    try:
        config = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail_config(exc)
    warning = server.check_workers(config, workers)
    if warning:
        click.secho(warning, fg="yellow", err=True)
    if config_path is None and not is_loopback(config.server.host):
        click.secho(
            f"the built-in default's development key {DEV_KEY} is off: {config.server.host} "
            "can be reached from other machines (give --config with keys of your own)",
            fg="yellow",
            err=True,
        )
    server.run(config, config_path=config_path, overrides=overrides, workers=workers)


def _flag_overrides(
    host: str | None, port: int | None, log_level: str | None
) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    if host is not None:
        overrides.setdefault("server", {})["host"] = host
    if port is not None:
        overrides.setdefault("server", {})["port"] = port
    if log_level is not None:
        overrides[""] = {"log_level": log_level}
    return overrides


def _fail_config(exc: ConfigError) -> None:
    for line in str(exc).splitlines():
        click.echo(line, err=True)
    sys.exit(2)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file: exit 0, or exit 2 listing every error as `field.path: problem`."""
    from .gateway.config import load_config

    try:
        config = load_config(path, environ={})
    except ConfigError as exc:
        _fail_config(exc)
    tiers = ", ".join(config.tiers) or "none"
    backends = (
        "backends " + ", ".join(f"{b.name} ({b.kind})" for b in config.backends)
        if config.backends
        else f"backend {config.backend.kind}"
    )
    click.echo(
        f"{path}: OK · storage {config.storage.url.split('@')[-1]} · {backends}"
        f" · tiers {tiers} · {len(config.keys)} key{'' if len(config.keys) == 1 else 's'}"
    )


@main.command("reset")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--key", "api_key", help="Only this API key's counters.")
@click.option("--ip", help="Only this client address's counters (anonymous callers).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset(config_path: str | None, api_key: str | None, ip: str | None, yes: bool) -> None:
    """Forget counters in the configured Redis: every client's, or one client's.

    Deletes the keys under the storage's prefix (SCAN + UNLINK), for every gateway sharing it.
    """
    import asyncio

    from .gateway import server
    from .gateway.callers import api_key_client
    from .gateway.config import load_config
    from .identity import mask_key
    from .keys import ip_client_id
    from .storage import mask_url

    if api_key is not None and ip is not None:
        click.echo("give --key or --ip, not both", err=True)
        sys.exit(2)
    try:
        config = load_config(config_path)
        storage = server.redis_of(config)
    except ConfigError as exc:
        _fail_config(exc)
    if storage is None:
        click.echo(
            f"storage {mask_url(config.storage.url)} keeps counters inside each gateway "
            "process: restart the gateway to reset them",
            err=True,
        )
        sys.exit(1)
    client = None
    whose = "every client"
    if api_key is not None:
        client, whose = api_key_client(api_key), f"key {mask_key(api_key)}"
    elif ip is not None:
        client, whose = ip_client_id(ip), f"ip {ip}"
    scope = server.describe_storage(storage, config.storage.url)
    if not yes:
        click.confirm(f"Delete the counters of {whose} under {scope}?", abort=True)
    try:
        deleted = asyncio.run(server.reset_counters(storage, client))
    except (StorageError, ConfigError) as exc:
        click.echo(f"reset failed: {exc}", err=True)
        sys.exit(1)
    click.echo(f"reset: {deleted} keys deleted ({whose}) under {scope}")


@main.group()
def keys() -> None:
    """Make and hash API keys; issue, list, change, revoke and rotate them on a running
    gateway (its admin API: --url, the admin key in $QUOTAGATE_ADMIN_KEY)."""


@keys.command("new")
@click.option("--tier", default="free", show_default=True, help="Tier of the new key.")
@click.option("--name", help="A name for the key (shown in the config only).")
def keys_new(tier: str, name: str | None) -> None:
    """Print a fresh key, then the [[keys]] block (with its SHA-256) to paste in the config."""
    key = "sk-qg-" + secrets.token_urlsafe(32)
    click.echo(key)
    click.echo("")
    click.echo("[[keys]]")
    click.echo(f'sha256 = "{hash_api_key(key)}"')
    click.echo(f'tier = "{tier}"')
    if name:
        click.echo(f'name = "{name}"')


@keys.command("hash")
@click.argument("key")
def keys_hash(key: str) -> None:
    """Print the SHA-256 hex digest of KEY (what `sha256 = ...` in the config holds)."""
    click.echo(hash_api_key(key))


def _admin_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--url``, ``--admin-key-file`` and ``--json`` of the commands driving the admin API."""
    command = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")(command)
    command = click.option(
        "--admin-key-file",
        type=click.Path(dir_okay=False),
        help="File holding the admin key (default: $QUOTAGATE_ADMIN_KEY).",
    )(command)
    return click.option(
        "--url", default="http://127.0.0.1:8000", show_default=True, help="The gateway."
    )(command)


def _admin_call(url: str, key_file: str | None, method: str, path: str, body: Any = None) -> Any:
    from .tools.admin_client import AdminClient, admin_key

    client = AdminClient(url, admin_key(key_file))
    try:
        return client.call(method, path, body)
    finally:
        client.close()


def _key_fields(
    tier: str | None,
    name: str | None,
    expires_at: str | None,
    requests: str | None,
    tokens: str | None,
    concurrency: int | None,
    models: tuple[str, ...],
) -> dict[str, Any]:
    """The body of a create or update: only what was given."""
    body: dict[str, Any] = {}
    for field, value in (("tier", tier), ("name", name), ("expires_at", expires_at)):
        if value is not None:
            body[field] = value
    limits = {"requests": requests, "tokens": tokens, "concurrency": concurrency}
    if any(value is not None for value in limits.values()):
        body["limits"] = {k: v for k, v in limits.items() if v is not None}
    if models:
        body["models"] = list(models)
    return body


def _key_field_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(
        [
            click.option("--name", help="A name for the key (a customer, a service)."),
            click.option("--expires-at", help="When it stops working: 2027-01-01T00:00:00Z."),
            click.option("--requests", help="Its own request limit over the tier's: 600/minute."),
            click.option("--tokens", help="Its own token limit over the tier's."),
            click.option("--concurrency", type=click.IntRange(min=1), help="Its own slots."),
            click.option("--model", "models", multiple=True, help="Allowed model (repeatable)."),
        ]
    ):
        command = option(command)
    return command


@keys.command("create")
@click.option("--tier", required=True, help="Tier of the new key.")
@_key_field_options
@_admin_options
def keys_create(url: str, admin_key_file: str | None, as_json: bool, **fields: Any) -> None:
    """Issue a key through the admin API; its secret is printed this once."""
    from .tools.admin_client import print_key

    body = _key_fields(**fields)
    print_key(_admin_call(url, admin_key_file, "POST", "/admin/keys", body), as_json)


@keys.command("list")
@_admin_options
def keys_list(url: str, admin_key_file: str | None, as_json: bool) -> None:
    """Every key, issued and from the config file (never a secret)."""
    from .tools.admin_client import print_keys

    print_keys(_admin_call(url, admin_key_file, "GET", "/admin/keys")["data"], as_json)


@keys.command("show")
@click.argument("key_id")
@_admin_options
def keys_show(key_id: str, url: str, admin_key_file: str | None, as_json: bool) -> None:
    """One key's fields (never its secret)."""
    from .tools.admin_client import print_key

    print_key(_admin_call(url, admin_key_file, "GET", f"/admin/keys/{key_id}"), as_json)


@keys.command("update")
@click.argument("key_id")
@click.option("--tier", help="Its new tier.")
@_key_field_options
@_admin_options
def keys_update(
    key_id: str, url: str, admin_key_file: str | None, as_json: bool, **fields: Any
) -> None:
    """Change a key's tier, name, limits, models or expiry (what is given only)."""
    from .tools.admin_client import print_key

    body = _key_fields(**fields)
    if not body:
        raise click.UsageError("nothing to change: give --tier, --name, --requests, ...")
    answer = _admin_call(url, admin_key_file, "PATCH", f"/admin/keys/{key_id}", body)
    print_key(answer, as_json)


@keys.command("revoke")
@click.argument("key_id")
@_admin_options
def keys_revoke(key_id: str, url: str, admin_key_file: str | None, as_json: bool) -> None:
    """Revoke a key: its next request, on every replica within a second, is a 401."""
    from .tools.admin_client import print_key

    print_key(_admin_call(url, admin_key_file, "DELETE", f"/admin/keys/{key_id}"), as_json)


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Seconds the old secret keeps working.")  # fmt: skip
@_admin_options
def keys_rotate(
    key_id: str, grace_s: float, url: str, admin_key_file: str | None, as_json: bool
) -> None:
    """A new secret for the same key (its limits and counters carry over), printed this once."""
    from .tools.admin_client import print_key

    body = {"grace_s": grace_s}
    print_key(
        _admin_call(url, admin_key_file, "POST", f"/admin/keys/{key_id}/rotate", body), as_json
    )


@main.command("usage")
@click.option("--key", "key_id", help="One key's id (key_..., cfg_...) or tier:<name>.")
@click.option("--from", "start", help="First UTC day, 2026-12-01 (default today).")
@click.option("--to", "end", help="Last UTC day (default today).")
@click.option(
    "--group-by", type=click.Choice(["day", "model", "key"]), default="day", show_default=True
)
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of a table.")
@_admin_options
def usage(
    key_id: str | None,
    start: str | None,
    end: str | None,
    group_by: str,
    as_csv: bool,
    url: str,
    admin_key_file: str | None,
    as_json: bool,
) -> None:
    """Requests admitted and rejected, prompt and completion tokens, from the usage ledger."""
    from .tools.admin_client import print_usage

    query = {"key": key_id, "from": start, "to": end, "group_by": group_by}
    path = "/admin/usage?" + urlencode({k: v for k, v in query.items() if v is not None})
    answer = _admin_call(url, admin_key_file, "GET", path)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    print_usage(answer, as_csv)


_POSITIVE = click.FloatRange(min=0, min_open=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9000, show_default=True)
@click.option(
    "--tokens-per-second",
    type=click.FloatRange(min=0),
    help="Each answer's pace (default 0: at once); with --gpu, a full batch's throughput "
    "(default 4000).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="A model name it lists and serves (repeat for more; default quotagate-mock).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Waited before each answer.",
)
@click.option(
    "--output-tokens",
    type=click.IntRange(min=1),
    help="An answer's length when its max_tokens is not shorter (default 24).",
)
@click.option(
    "--gpu",
    is_flag=True,
    help="Pace answers by a simulated GPU (batching, a KV cache) and serve vLLM's /metrics.",
)
@click.option(
    "--kv-tokens",
    type=click.IntRange(min=1),
    help="With --gpu: the KV cache in tokens, prompt + output in flight (default 200000).",
)
@click.option(
    "--step-ms",
    type=_POSITIVE,
    help="With --gpu: the shortest decode step (default 20: 50 tokens/s for a lone request).",
)
@click.option(
    "--prefill-tokens-per-second",
    type=_POSITIVE,
    help="With --gpu: prompt tokens processed a second (default 10 x --tokens-per-second).",
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    help="With --gpu: answer 503 rather than queue more than N requests (default: no limit).",
)
def mock(
    host: str,
    port: int,
    tokens_per_second: float | None,
    models: tuple[str, ...],
    latency_ms: float,
    output_tokens: int | None,
    gpu: bool,
    kv_tokens: int | None,
    step_ms: float | None,
    prefill_tokens_per_second: float | None,
    max_queued: int | None,
) -> None:
    """Serve the mock model alone, as an OpenAI-compatible model server (no limits).

    Several on their own ports, each with its --model names, stand in for a fleet of replicas.
    With --gpu it behaves like one vLLM replica: requests share a GPU's throughput, wait for
    room in its KV cache, and GET /metrics shows vLLM's gauges.
    """
    import uvicorn

    from .gateway.backends import MOCK_MODEL
    from .gateway.backends.gpu import GpuOptions
    from .gateway.backends.mock import NATURAL_LENGTH, create_mock_app

    engine: dict[str, Any] = {  # the GpuOptions fields given (their defaults are GpuOptions')
        "kv_tokens": kv_tokens,
        "step_ms": step_ms,
        "prefill_tokens_per_second": prefill_tokens_per_second,
        "max_queued": max_queued,
    }
    given = {name: value for name, value in engine.items() if value is not None}
    options = None
    if gpu:
        if tokens_per_second == 0:
            raise click.BadParameter("must be above 0 with --gpu", param_hint="--tokens-per-second")
        if tokens_per_second is not None:
            given["tokens_per_second"] = tokens_per_second
        options = GpuOptions(**given)
    elif given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"{flags}: only with --gpu")
    app = create_mock_app(
        tokens_per_second or 0.0,
        models=models or (MOCK_MODEL,),
        latency_s=latency_ms / 1000,
        output_tokens=output_tokens or NATURAL_LENGTH,
        gpu=options,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


from .tools.bench import bench_command  # noqa: E402
from .tools.verify import verify_command  # noqa: E402

main.add_command(verify_command, "verify")
main.add_command(bench_command, "bench")

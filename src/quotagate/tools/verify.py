"""``quotagate verify``: the seed tutorial's Verification list as a command, with an evidence
record.

The tutorial asks an operator to confirm the starting state, run the smallest complete path,
compare against the expected output and keep the evidence (command, versions, observed output)
so the result can be reproduced. This does exactly that against a gateway, either one it is
pointed at (``--url``) or one it starts itself on a free loopback port and stops by pid:

- the (N+1)th rapid request is 429 with the tutorial's exact JSON body;
- Retry-After is present and sensible;
- rate-limit headers are on the successful responses, and they move;
- two API keys are counted independently (the tutorial's first "common failure");
- /health is not limited at the inference threshold;
- with ``--restart``, counters reset after a restart (memory) or a FLUSHDB (Redis).

Exit 0 when every check passes, 1 when one fails, 2 on a usage or connection error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import httpx

from .. import __version__
from ..errors import ConfigError, StorageError
from ..identity import hash_api_key, mask_key
from ..rates import Rate, parse_rates
from ..storage import mask_url
from ..storage.base import split_query
from ._common import (
    OneLineErrorsCommand,
    ToolError,
    command_argv,
    mask_password,
    masked_command,
)
from ._gateway import GatewayProcess

if TYPE_CHECKING:
    from ..gateway.config import GatewayConfig

__all__ = ["verify_command"]

COMPLETIONS = "/v1/completions"
HEALTH = "/health"
MOCK_MODEL = "quotagate-mock"
#: The contract's headers on every successful response of a limited route.
REQUIRED_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)
#: Upper bound on requests when the limit cannot be known in advance (no config, no headers).
PROBE_CAP = 1000
_STORAGE_PARAMS = ("fallback", "fallback_share", "timeout_ms", "prefix", "max_keys")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis+cluster", "rediss+cluster")


# -- evidence ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """One request and what came back, as the evidence record keeps it (key masked)."""

    method: str
    path: str
    key: str | None  # masked
    status: int
    headers: dict[str, str]
    body: Any
    at: float  # seconds since verify started
    elapsed_ms: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def int_header(self, name: str) -> int | None:
        value = self.headers.get(name)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {
            "request": {"method": self.method, "path": self.path, "key": self.key},
            "response": {"status": self.status, "headers": self.headers, "body": self.body},
            "at_s": round(self.at, 4),
            "elapsed_ms": round(self.elapsed_ms, 2),
        }

    def line(self) -> str:
        """The exchange in one line for people: status, rate-limit headers, error body."""
        who = f" [{self.key}]" if self.key else ""
        parts = [f"{self.method} {self.path}{who} -> {self.status}"]
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
            if name in self.headers:
                parts.append(f"{name} {self.headers[name]}")
        for name in ("x-ratelimit-remaining-requests", "retry-after", "retry-after-ms"):
            if name in self.headers:
                parts.append(f"{name} {self.headers[name]}")
        if self.status >= 400:
            parts.append(json.dumps(self.body) if not isinstance(self.body, str) else self.body)
        return " · ".join(parts)


@dataclass(slots=True)
class Check:
    """A check's verdict, the one-line reason, and the exchanges that prove it."""

    name: str
    title: str
    passed: bool
    reason: str
    exchanges: list[Exchange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # evidence lines for people

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "reason": self.reason,
            "notes": self.notes,
            "evidence": [exchange.to_json() for exchange in self.exchanges],
        }


def _relevant_headers(headers: httpx.Headers) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name.startswith(("x-ratelimit", "ratelimit", "retry-after")) or name == "content-type"
    }


def _body(response: httpx.Response) -> Any:
    """The body as evidence: JSON (a 200 completion reduced to id/model/usage) or short text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text
        return text if len(text) <= 300 else text[:300] + "…"
    if response.status_code == 200 and isinstance(body, dict) and "choices" in body:
        return {k: body[k] for k in ("id", "object", "model", "usage") if k in body}
    return body


class Client:
    """httpx with the evidence bookkeeping, and connection errors turned into exit 2."""

    def __init__(self, base_url: str, timeout: float, started: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.started = started
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def call(
        self, method: str, path: str, key: str | None = None, body: dict[str, Any] | None = None
    ) -> Exchange:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        begin = time.perf_counter()
        try:
            response = self.http.request(method, path, headers=headers, json=body)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            detail = str(exc) or type(exc).__name__
            where = mask_password(self.base_url + path)
            raise ToolError(f"cannot reach {where}: {detail}") from None
        elapsed = time.perf_counter() - begin
        return Exchange(
            method=method,
            path=path,
            key=mask_key(key) if key else None,
            status=response.status_code,
            headers=_relevant_headers(response.headers),
            body=_body(response),
            at=begin - self.started,
            elapsed_ms=elapsed * 1000,
        )

    def json(self, path: str, key: str | None = None) -> tuple[int, Any]:
        exchange = self.call("GET", path, key)
        return exchange.status, exchange.body

    def close(self) -> None:
        self.http.close()


# -- what is being tested --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitUnderTest:
    """The request limit the burst runs into: N per window, and where that came from."""

    limit: int | None
    window: float | None
    text: str
    source: str
    tier: str | None = None

    @property
    def interval(self) -> float | None:
        """Seconds between two refills (GCRA emission interval)."""
        if self.limit and self.window:
            return self.window / self.limit
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "rate": self.text,
            "limit": self.limit,
            "window_s": self.window,
            "source": self.source,
        }


def _tightest(rates: tuple[Rate, ...]) -> Rate:
    """The rate a rapid burst hits first: the smallest capacity (GCRA admits N at once)."""
    return min(rates, key=lambda rate: (rate.amount, rate.period))


def _policy_window(policy: str | None, limit: int) -> float | None:
    """The window ``w`` of the IETF RateLimit-Policy item whose quota ``q`` is ``limit``."""
    if not policy:
        return None
    for item in policy.split(","):
        params = dict(part.strip().split("=", 1) for part in item.split(";")[1:] if "=" in part)
        try:
            if int(params.get("q", "")) == limit:
                return float(params["w"])
        except (ValueError, KeyError):
            continue
    return None


def _limit_from_headers(exchange: Exchange, source: str) -> LimitUnderTest | None:
    # The requests-specific OpenAI header first: X-RateLimit-Limit names the most restrictive
    # limit, which on the gateway may be a token limit.
    limit = exchange.int_header("x-ratelimit-limit-requests") or exchange.int_header(
        "x-ratelimit-limit"
    )
    if limit is None or limit < 1:
        return None
    window = _policy_window(exchange.header("ratelimit-policy"), limit)
    text = str(Rate(limit, window)) if window else f"{limit} per unknown window"
    return LimitUnderTest(limit, window, text, source)


def _remaining(exchange: Exchange) -> int | None:
    value = exchange.int_header("x-ratelimit-remaining-requests")
    return value if value is not None else exchange.int_header("x-ratelimit-remaining")


@dataclass(slots=True)
class KeyInfo:
    secret: str
    tier: str | None  # as the config says, None when unknown
    added: bool = False  # added to the config of this run only

    @property
    def masked(self) -> str:
        return mask_key(self.secret)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# -- config and storage ------------------------------------------------------------------------


def _load_config(path: str | None) -> GatewayConfig:
    from ..gateway.config import load_config

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
    from ..gateway.config import DEFAULT_CONFIG

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


def _is_redis(url: str) -> bool:
    return url.split("://", 1)[0].lower() in _REDIS_SCHEMES


async def _with_redis(url: str, action: Callable[[Any], Any]) -> Any:
    """Connect as the gateway's storage does and run ``action(storage)``."""
    from ..storage.redis import RedisStorage

    rest, _ = split_query(url, _STORAGE_PARAMS)
    storage = RedisStorage(rest, timeout=2.0)
    await storage.start()
    try:
        result = action(storage)
        if asyncio.iscoroutine(result):
            result = await result
        return result
    finally:
        await storage.aclose()


def _redis_version(url: str) -> str:
    try:
        return str(asyncio.run(_with_redis(url, lambda storage: storage.server_version)))
    except StorageError as exc:
        return f"unreachable ({exc})"


def _flushdb(url: str) -> None:
    try:
        asyncio.run(_with_redis(url, lambda storage: storage.client.flushdb()))
    except StorageError as exc:
        raise ToolError(f"cannot FLUSHDB: {exc}") from None


def _sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the run -----------------------------------------------------------------------------------


class Verification:
    """One run: starting state, the burst, the checks, the report."""

    def __init__(
        self,
        *,
        url: str | None,
        config_path: str | None,
        keys: tuple[str, ...],
        tier: str | None,
        restart: bool,
        model: str | None,
        timeout: float,
        echo: Callable[[str], None],
    ) -> None:
        self.url = url
        self.config_path = config_path
        self.keys = keys
        self.tier = tier
        self.restart = restart
        self.model = model
        self.timeout = timeout
        self.echo = echo
        self.started = time.perf_counter()
        self.started_at = dt.datetime.now(dt.UTC)
        self.environment: dict[str, Any] = {}
        self.checks: list[Check] = []
        self.config: GatewayConfig | None = None
        self.key_infos: list[KeyInfo] = []
        self.process: GatewayProcess | None = None

    # -- setup -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gateway(self) -> Iterator[Client]:
        """The gateway under test: the one at ``--url``, or one started here and stopped by pid."""
        if self.url is not None:
            self.config = _load_config(self.config_path) if self.config_path else None
            known = {key.digest: key.tier for key in self.config.keys} if self.config else {}
            self.key_infos = [KeyInfo(k, known.get(hash_api_key(k))) for k in self.keys]
            with self._client(self.url) as client:
                yield client
            return
        config = self.config = _load_config(self.config_path)
        with tempfile.TemporaryDirectory(prefix="quotagate-verify-") as workdir:
            served, self.key_infos = _prepare_config(
                config, self.config_path, self.keys, self.tier, Path(workdir)
            )
            process = self.process = GatewayProcess(served)
            try:
                process.start()
                with self._client(process.url) as client:
                    yield client
            finally:
                process.close()

    @contextlib.contextmanager
    def _client(self, url: str) -> Iterator[Client]:
        client = Client(url, self.timeout, self.started)
        try:
            yield client
        finally:
            client.close()

    def starting_state(self, client: Client) -> None:
        """Confirm and print what is about to be tested (the tutorial's first step)."""
        status, health = client.json(HEALTH)
        if status != 200 or not isinstance(health, dict) or "status" not in health:
            raise ToolError(
                f"GET {client.base_url}{HEALTH} answered {status}, not the gateway's "
                f'{{"status": "ok", ...}}: is this a quotagate gateway?'
            )
        model = self.model
        if model is None:
            status, models = client.json("/v1/models")
            data = models.get("data") if status == 200 and isinstance(models, dict) else None
            first = data[0] if isinstance(data, list) and data else None
            model = first.get("id") if isinstance(first, dict) else None
            model = model if isinstance(model, str) else MOCK_MODEL
        self.model = model
        for info in self.key_infos:
            status, state = client.json("/v1/ratelimit", info.secret)
            if status == 401:
                error = state.get("error") if isinstance(state, dict) else state
                raise ToolError(f"key {info.masked} was refused by the gateway: 401 {error}")
            if status == 200 and isinstance(state, dict) and info.tier is None:
                info.tier = state.get("tier")

        config = self.config
        storage: dict[str, Any] = {"url": None, "mode": health.get("storage")}
        backend: dict[str, Any] = {"kind": None, "url": None}
        config_record: dict[str, Any] = {"path": None, "digest": None, "file_sha256": None}
        health_limit: str | None = None
        if config is not None:
            from ..gateway.config import config_digest

            storage["url"] = mask_url(config.storage.url)
            if _is_redis(config.storage.url):
                storage["redis_version"] = _redis_version(config.storage.url)
            url = config.backend.url
            backend = {"kind": config.backend.kind, "url": mask_url(url) if url else None}
            config_record = {
                "path": self.config_path or "built-in default",
                "digest": config_digest(config),
                "file_sha256": _sha256_file(self.config_path) if self.config_path else None,
            }
            health_limit = config.health.requests
        self.environment = {
            "quotagate": __version__,
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "platform": platform.platform(),
            "gateway": {
                "url": mask_password(client.base_url),
                "started_by_verify": self.process is not None,
                "pid": self.process.pid if self.process else None,
                "version": health.get("version"),
                "health": health,
            },
            "config": config_record,
            "storage": storage,
            "backend": backend,
            "model": model,
            "keys": [
                {"key": info.masked, "tier": info.tier, "added_for_this_run": info.added}
                for info in self.key_infos
            ],
            "health_limit": health_limit,
        }

        gateway = self.environment["gateway"]
        where = mask_password(client.base_url) + (
            f" (started by verify, pid {gateway['pid']})" if self.process else " (--url)"
        )
        storage_text = storage["url"] or "unknown (no --config)"
        if "redis_version" in storage:
            storage_text += f" (Redis {storage['redis_version']})"
        storage_text += f" · mode {storage['mode']}"
        if storage["mode"] == "fallback":
            storage_text += " (Redis unreachable: the gateway decides in memory)"
        backend_text = (
            f"{backend['kind']}" + (f" {backend['url']}" if backend["url"] else "")
            if backend["kind"]
            else "unknown (no --config)"
        )
        if config_record["path"] is None:
            config_text = "unknown (no --config)"
        else:
            config_text = f"{config_record['path']} (digest {config_record['digest']})"
        keys_text = ", ".join(
            f"{info.masked} -> tier {info.tier or 'unknown'}"
            + (" (added for this run)" if info.added else "")
            for info in self.key_infos
        )
        self.echo("quotagate verify · starting state")
        for label, value in [
            ("quotagate", f"{__version__} (gateway reports {gateway['version']})"),
            ("python", f"{platform.python_version()} · {sys.executable}"),
            ("config", config_text),
            ("storage", storage_text),
            ("backend", backend_text),
            ("gateway", where),
            ("model", model),
            ("keys", keys_text),
        ]:
            self.echo(f"  {label:<10} {value}")

    def limit_for(self, info: KeyInfo) -> LimitUnderTest | None:
        """The request limit of a key's tier from the config, when the config knows it."""
        if self.config is None or info.tier is None or info.tier not in self.config.tiers:
            return None
        text = self.config.tiers[info.tier].requests
        if not text:
            return None
        rate = _tightest(parse_rates(text))
        return LimitUnderTest(rate.amount, rate.period, str(rate), "config", info.tier)

    # -- the checks ----------------------------------------------------------------------------

    def run(self, client: Client) -> None:
        first_key, second_key = self.key_infos
        body = {"model": self.model, "prompt": "hi", "max_tokens": 1}

        def complete(info: KeyInfo) -> Exchange:
            return client.call("POST", COMPLETIONS, info.secret, body)

        first = complete(first_key)
        if first.status in (401, 403):
            raise ToolError(f"key {first_key.masked} was refused: {first.status} {first.body}")
        if first.status == 429:
            raise ToolError(
                f"key {first_key.masked} is over its limit already (Retry-After "
                f"{first.header('retry-after')} s): wait, or verify with an unused key"
            )
        if first.status != 200:
            raise ToolError(f"POST {COMPLETIONS} answered {first.status}: {first.body}")

        configured = self.limit_for(first_key)
        from_headers = _limit_from_headers(first, "the first response's headers")
        limit = configured or from_headers
        if limit is not None and limit.tier is None:
            limit = LimitUnderTest(
                limit.limit, limit.window, limit.text, limit.source, first_key.tier
            )
        self.environment["limit"] = limit.to_json() if limit else None
        remaining = _remaining(first)
        if remaining is None and limit is not None and limit.limit is not None:
            remaining = limit.limit - 1  # no headers: assume an unused key, as when started here
        expected = None if remaining is None else 1 + remaining  # 200s before the 429
        if limit is not None:
            self.echo(
                f"  {'limit':<10} {limit.text} requests for tier {limit.tier or 'unknown'} "
                f"(from {limit.source})"
                + (
                    f": {expected} rapid requests pass, the {_ordinal(expected + 1)} is 429"
                    if expected is not None
                    else ""
                )
            )
        else:
            self.echo(f"  {'limit':<10} unknown: no --config and no rate-limit headers")
        if self.environment["health_limit"]:
            self.echo(f"  {'health':<10} {self.environment['health_limit']} per client")
        self.echo("")

        burst = [first]
        interval = limit.interval if limit else None
        cap = PROBE_CAP if expected is None else 2 * expected + 100
        while burst[-1].status == 200 and len(burst) < cap:
            if expected is not None:
                elapsed = time.perf_counter() - self.started - first.at
                allowance = math.floor(elapsed / interval) if interval else 0
                if len(burst) >= expected + 1 + allowance:
                    break  # the request that had to be 429 was sent, and was not
            burst.append(complete(first_key))
        burst_seconds = burst[-1].at + burst[-1].elapsed_ms / 1000 - first.at
        rejected = burst[-1] if burst[-1].status != 200 else None
        if expected is None and rejected is not None:
            # No config and no headers on the 200s: a 429 still has to say what limit it hit.
            limit = _limit_from_headers(rejected, "the 429's headers (none on the 200s)")
            if limit is not None:
                limit = LimitUnderTest(
                    limit.limit, limit.window, limit.text, limit.source, first_key.tier
                )
                self.environment["limit"] = limit.to_json()
                expected = limit.limit  # an unused key, as it had to be
                interval = limit.interval
        refills = math.floor(burst_seconds / interval) if interval else 0

        self._check_headers(
            [e for e in burst if e.status == 200], configured, from_headers, refills
        )
        self._check_limit(burst, expected, refills, burst_seconds, limit)
        self._check_retry_after(rejected, limit)
        self._check_independent(complete, first_key, second_key, rejected)
        self._check_health(client, first_key, limit, len([e for e in burst if e.status == 200]))
        if self.restart:
            self._check_restart(complete, first_key, limit, rejected)
        elif self.process is not None:
            self.echo("note: counters after a restart were not checked (add --restart)")
        else:
            self.echo("note: counters after a restart are checked only on a gateway verify starts")

    def _report(self, check: Check) -> None:
        self.checks.append(check)
        self.echo(f"{'PASS' if check.passed else 'FAIL'}  {check.title}")
        if not check.passed:
            self.echo(f"      reason: {check.reason}")
        for note in check.notes:
            self.echo(f"      {note}")
        self.echo("")

    def _check_headers(
        self,
        admitted: list[Exchange],
        configured: LimitUnderTest | None,
        from_headers: LimitUnderTest | None,
        refills: int,
    ) -> None:
        title = "rate-limit headers on successful responses"
        problems: list[str] = []
        missing: dict[str, int] = {}
        for exchange in admitted:
            for name in REQUIRED_HEADERS:
                if name not in exchange.headers:
                    missing[name] = missing.get(name, 0) + 1
        if missing:
            names = ", ".join(
                f"{name} (missing on {n} of {len(admitted)})" for name, n in missing.items()
            )
            problems.append(f"headers absent from 200 responses: {names}")
        for exchange in admitted:
            for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
                value = exchange.headers.get(name)
                if value is not None and not (value.isdigit()):
                    problems.append(f"{name} is not a non-negative integer (got {value!r})")
                    break
            limit_value = exchange.int_header("x-ratelimit-limit")
            left = exchange.int_header("x-ratelimit-remaining")
            if limit_value is not None and left is not None and left > limit_value:
                problems.append(f"x-ratelimit-remaining {left} > x-ratelimit-limit {limit_value}")
        series = [r for r in (_remaining(e) for e in admitted) if r is not None]
        if len(series) >= 2:
            rises = sum(1 for a, b in itertools.pairwise(series) if b > a)
            if series[-1] > series[0] - (len(series) - 1) + refills or rises > refills:
                problems.append(
                    f"remaining does not go down as requests are admitted: {series[:12]}"
                    + ("…" if len(series) > 12 else "")
                    + " (headers not updating)"
                )
        if (
            configured is not None
            and from_headers is not None
            and configured.limit != from_headers.limit
        ):
            problems.append(
                f"the gateway reports a request limit of {from_headers.limit}, the config says "
                f"{configured.limit} ({configured.text}): is it running this config?"
            )
        notes = []
        if admitted:
            head = admitted[0]
            shown = ", ".join(
                f"{name}: {head.headers[name]}"
                for name in (*REQUIRED_HEADERS[:4], "x-ratelimit-limit-requests")
                if name in head.headers
            )
            notes.append(f"first 200: {shown or 'no rate-limit headers'}")
            if series:
                notes.append(
                    f"remaining (requests) over {len(admitted)} admitted: {series[0]} -> "
                    f"{series[-1]}"
                )
        else:
            problems.append("no successful response to look at")
        self._report(
            Check(
                "headers",
                title,
                not problems,
                "; ".join(problems)
                or "every 200 carries X-RateLimit-* and RateLimit fields, and remaining goes down",
                admitted,
                notes,
            )
        )

    def _check_limit(
        self,
        burst: list[Exchange],
        expected: int | None,
        refills: int,
        seconds: float,
        limit: LimitUnderTest | None,
    ) -> None:
        position = len(burst) if burst[-1].status != 200 else None
        nth = _ordinal(expected + 1) if expected is not None else "(N+1)th"
        title = f"the {nth} rapid request is 429 with the exact JSON body"
        notes = [
            f"{sum(e.status == 200 for e in burst)} requests -> 200 in {seconds:.2f} s"
            + (
                f" ({refills} refills possible at one per {limit.interval:g} s)"
                if limit and limit.interval and refills
                else ""
            )
        ]
        if limit is not None and limit.source.startswith("the 429"):
            notes.append(f"limit {limit.text} read from {limit.source}")
        problems: list[str] = []
        last = burst[-1]
        if position is None:
            problems.append(
                f"no 429 after {len(burst)} rapid requests"
                + (f" (expected one at request {expected + 1})" if expected is not None else "")
                + ": the limit is not enforced for this key (shadow mode? a key function that "
                "gives every request its own client?)"
            )
        else:
            notes.append(f"request {position}: {last.line()}")
            if last.status != 429:
                problems.append(f"request {position} answered {last.status}, not 429")
            elif expected is None:
                problems.append(
                    f"429 at request {position}, but the limit to expect is unknown: no --config "
                    "and no rate-limit headers to read it from"
                )
            elif not expected + 1 <= position <= expected + 1 + refills:
                problems.append(
                    f"429 at request {position}, expected at request {expected + 1}: the key "
                    "was charged more than once per request, or shares its counter"
                )
            if last.status == 429:
                problems += _body_problems(last)
        self._report(
            Check(
                "limit_429",
                title,
                not problems,
                "; ".join(problems) or f"request {position} is 429 with the tutorial's body",
                burst,
                notes,
            )
        )

    def _check_retry_after(self, rejected: Exchange | None, limit: LimitUnderTest | None) -> None:
        title = "Retry-After present and sensible"
        problems: list[str] = []
        notes: list[str] = []
        if rejected is None or rejected.status != 429:
            problems.append("no 429 to read Retry-After from")
        else:
            value = rejected.header("retry-after")
            body = rejected.body if isinstance(rejected.body, dict) else {}
            bound = math.ceil(limit.interval) if limit and limit.interval else None
            notes.append(
                f"Retry-After: {value} · body retry_after: {body.get('retry_after')} · "
                f"retry-after-ms: {rejected.header('retry-after-ms')}"
                + (
                    f" · {limit.text} frees one request every {limit.interval:g} s"
                    if limit and limit.interval
                    else ""
                )
            )
            if value is None:
                problems.append("no Retry-After header on the 429")
            elif not value.isdigit() or int(value) < 1:
                problems.append(f"Retry-After is not whole seconds >= 1 (got {value!r})")
            else:
                seconds = int(value)
                if bound is not None and seconds > bound:
                    problems.append(
                        f"Retry-After {seconds} s is longer than the {bound} s after which the "
                        f"limit ({limit.text if limit else '?'}) admits another request"
                    )
                if body.get("retry_after") != seconds:
                    problems.append(
                        f"body retry_after {body.get('retry_after')!r} differs from "
                        f"Retry-After {seconds}"
                    )
                millis = rejected.header("retry-after-ms")
                if millis is not None and (
                    not millis.isdigit() or math.ceil(int(millis) / 1000) != seconds
                ):
                    problems.append(f"retry-after-ms {millis} disagrees with Retry-After {seconds}")
        self._report(
            Check(
                "retry_after",
                title,
                not problems,
                "; ".join(problems)
                or "whole seconds, within one refill interval, and the body agrees",
                [rejected] if rejected else [],
                notes,
            )
        )

    def _check_independent(
        self,
        complete: Callable[[KeyInfo], Exchange],
        first_key: KeyInfo,
        second_key: KeyInfo,
        rejected: Exchange | None,
    ) -> None:
        title = "the two keys are counted independently"
        second = complete(second_key)
        again = complete(first_key)
        problems: list[str] = []
        notes = [f"key 2: {second.line()}", f"key 1 again: {again.line()}"]
        if rejected is None or rejected.status != 429:
            problems.append(f"key 1 ({first_key.masked}) was never limited, so nothing to compare")
        elif second.status == 429:
            problems.append(
                f"key 2 ({second_key.masked}) got 429 right after key 1 ({first_key.masked}) used "
                "up its limit: the gateway counts both keys as one client (its key function "
                "must use the API key, not a constant or the IP)"
            )
        elif second.status != 200:
            problems.append(f"key 2 ({second_key.masked}) answered {second.status}, not 200")
        else:
            second_limit = self.limit_for(second_key)
            left = _remaining(second)
            fresh = self.process is not None  # a gateway started here: key 2 is unused
            if (
                fresh
                and second_limit
                and second_limit.limit
                and left is not None
                and left != second_limit.limit - 1
            ):
                problems.append(
                    f"key 2's first request left {left} of {second_limit.limit}, not "
                    f"{second_limit.limit - 1}: its counter is shared with key 1's"
                )
        self._report(
            Check(
                "independent_keys",
                title,
                not problems,
                "; ".join(problems) or "key 2 was admitted while key 1 was limited",
                [second, again],
                notes,
            )
        )

    def _check_health(
        self, client: Client, key: KeyInfo, limit: LimitUnderTest | None, admitted: int
    ) -> None:
        threshold = limit.limit if limit and limit.limit else admitted
        count = threshold + 1
        title = f"/health is not limited at the inference threshold ({count} requests pass)"
        exchanges: list[Exchange] = []
        for _ in range(count):
            exchanges.append(client.call("GET", HEALTH, key.secret))
            if exchanges[-1].status != 200:
                break
        problems: list[str] = []
        last = exchanges[-1]
        notes = [
            f"{sum(e.status == 200 for e in exchanges)} x GET {HEALTH} [{key.masked}] -> 200 "
            f"(key 1 is over its inference limit)",
            f"last: {last.line()}",
        ]
        if last.status != 200:
            problems.append(
                f"GET {HEALTH} answered {last.status} at request {len(exchanges)} of {count}: "
                "health is limited at or below the inference threshold, or shares its counter"
            )
        health_limit = last.int_header("x-ratelimit-limit")
        if health_limit is not None and health_limit <= threshold:
            problems.append(
                f"/health's limit ({health_limit}) is not above the inference limit ({threshold})"
            )
        self._report(
            Check(
                "health_not_limited",
                title,
                not problems,
                "; ".join(problems) or f"{count} health requests passed",
                exchanges,
                notes,
            )
        )

    def _check_restart(
        self,
        complete: Callable[[KeyInfo], Exchange],
        key: KeyInfo,
        limit: LimitUnderTest | None,
        rejected: Exchange | None,
    ) -> None:
        assert self.process is not None
        assert self.config is not None
        url = self.config.storage.url
        redis = _is_redis(url)
        title = (
            "counters reset after FLUSHDB (Redis keeps them across a restart)"
            if redis
            else "counters reset after a restart (memory storage)"
        )
        problems: list[str] = []
        notes: list[str] = []
        exchanges: list[Exchange] = []
        if rejected is None or rejected.status != 429:
            problems.append("key 1 was never limited, so there is nothing to reset")
        limit_value = limit.limit if limit else None
        self.process.restart()
        notes.append(f"restarted the gateway (pid {self.process.pid})")
        if redis:
            after_restart = complete(key)
            exchanges.append(after_restart)
            notes.append(f"after the restart: {after_restart.line()}")
            left = _remaining(after_restart)
            since = after_restart.at - (rejected.at if rejected else 0.0)
            full_again = limit is not None and limit.window is not None and since >= limit.window
            kept = after_restart.status == 429 or (
                left is not None and limit_value is not None and left < limit_value - 1
            )
            if not kept and not full_again:
                problems.append(
                    "counters did not survive the restart: the gateway is not keeping them in "
                    "Redis (fallback mode?)"
                )
            _flushdb(url)
            notes.append(f"FLUSHDB on {mask_url(url)}")
        after = complete(key)
        exchanges.append(after)
        notes.append(f"then: {after.line()}")
        left = _remaining(after)
        if after.status != 200:
            problems.append(f"key 1 still answered {after.status} after the reset")
        elif limit_value is not None and left is not None and left != limit_value - 1:
            problems.append(f"key 1 has {left} of {limit_value} left, not {limit_value - 1}")
        self._report(
            Check(
                "restart_resets",
                title,
                not problems,
                "; ".join(problems) or "key 1 starts over with a full limit",
                exchanges,
                notes,
            )
        )

    # -- the record ----------------------------------------------------------------------------

    def record(self, command: str) -> dict[str, Any]:
        return {
            "version": __version__,
            "command": command,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "passed": bool(self.checks) and all(check.passed for check in self.checks),
            "environment": self.environment,
            "checks": [check.to_json() for check in self.checks],
        }


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        valid = False
    if not valid:
        raise ToolError(f"--url: expected an http:// or https:// URL (got {mask_password(url)!r})")


def _body_problems(exchange: Exchange) -> list[str]:
    """How a 429 differs from the tutorial's body (plus the gateway's optional ``limit``)."""
    body = exchange.body
    if not isinstance(body, dict):
        return [f"the 429 body is not a JSON object (got {body!r})"]
    seconds = body.get("retry_after")
    expected = {
        "error": "rate_limit_exceeded",
        "message": f"Too many requests. Try again in {seconds} seconds.",
        "retry_after": seconds,
    }
    problems = []
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        problems.append(f"retry_after is not an integer (got {seconds!r})")
    core = {k: v for k, v in body.items() if k != "limit"}
    if core != expected:
        problems.append(
            f"the 429 body differs from the tutorial's: got {json.dumps(core)}, "
            f"expected {json.dumps(expected)}"
        )
    if "limit" in body and body["limit"] != "requests":
        problems.append(f'the 429 names limit {body["limit"]!r}, not "requests"')
    content_type = exchange.header("content-type") or ""
    if not content_type.startswith("application/json"):
        problems.append(f"the 429 Content-Type is {content_type!r}, not application/json")
    return problems


@click.command(
    "verify", cls=OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--url", help="A running gateway to check (else one is started here).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Gateway config: what to start, or what the --url gateway runs.",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="KEY",
    help="An API key; give two. Without --url they may be omitted: two throwaway "
    "keys are added to the config of the gateway started here.",
)
@click.option("--tier", help="Tier for keys the config does not list (default: free).")
@click.option(
    "--restart",
    is_flag=True,
    help="Also check that counters reset: restart the gateway (memory) or FLUSHDB "
    "its Redis database. Only for a gateway started here.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Write the evidence record as JSON.",
)
@click.option("--model", help="Model to request (default: the first of /v1/models).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds per request.",
)
def verify_command(
    url: str | None,
    config_path: str | None,
    keys: tuple[str, ...],
    tier: str | None,
    restart: bool,
    report_path: str | None,
    model: str | None,
    timeout: float,
) -> None:
    """Run the tutorial's verification checks against a gateway and record the evidence.

    Exit 0 when every check passes, 1 when one fails, 2 on a usage or connection error.
    """
    command = masked_command(command_argv(), secrets=keys)
    if len(keys) not in (0, 2):
        raise ToolError(
            "give two API keys, --key K1 --key K2, to check they are counted apart "
            f"(got {len(keys)})"
        )
    if len(keys) == 2 and keys[0] == keys[1]:
        raise ToolError("the two --key values are the same key")
    if url is not None:
        if not keys:
            raise ToolError("--url: give two API keys the gateway knows, --key K1 --key K2")
        if restart:
            raise ToolError("--restart needs a gateway that verify starts itself (drop --url)")
        if tier is not None:
            raise ToolError("--tier applies only to a gateway that verify starts itself")
        _check_url(url)
    verification = Verification(
        url=url,
        config_path=config_path,
        keys=keys,
        tier=tier,
        restart=restart,
        model=model,
        timeout=timeout,
        echo=click.echo,
    )
    with verification.gateway() as client:
        verification.starting_state(client)
        verification.run(client)
    record = verification.record(command)
    passed = sum(check.passed for check in verification.checks)
    failed = len(verification.checks) - passed
    summary = f"{len(verification.checks)} checks: {passed} passed, {failed} failed"
    if report_path is not None:
        text = json.dumps(record, indent=2, ensure_ascii=False)
        Path(report_path).write_text(text + "\n", "utf-8")
        summary += f" · evidence written to {report_path}"
    click.echo(summary)
    click.get_current_context().exit(0 if record["passed"] else 1)

"""Gateway configuration: TOML validated once, at the edge, with errors that name the field.

Precedence: built-in defaults < the TOML file < ``QUOTAGATE_*`` environment < CLI flags. With no
file, ``DEFAULT_CONFIG`` (three tiers and anonymous access, over the models' defaults: memory
storage, the mock model) is used so that ``quotagate serve`` runs with no set-up at all.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .._types import LogLevel
from ..errors import ConfigError
from ..identity import TrustedProxies, hash_api_key
from ..keys import prefix_problem
from ..rates import parse_rates
from ..storage import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_MS,
    FallbackPolicy,
    Storage,
    mask_url,
    scheme_error,
    storage_from_url,
)
from .budgets import Price, parse_budgets

__all__ = [
    "CATCH_ALL",
    "DEFAULT_CONFIG",
    "DEV_KEY",
    "LEGACY_BACKEND",
    "AdminConfig",
    "BackendConfig",
    "BudgetText",
    "ErrorFormat",
    "FleetBackendConfig",
    "GatewayConfig",
    "KeyConfig",
    "RateText",
    "ServerConfig",
    "TierConfig",
    "config_digest",
    "configured_storage",
    "describe_error",
    "env_name",
    "is_loopback",
    "load_config",
]


#: ``openai``: ``{"error": {"message", "type", "code", "param"}}``, what OpenAI clients read;
#: ``tutorial``: the seed tutorial's flat ``{"error": <code>, "message": ...}``.
ErrorFormat = Literal["openai", "tutorial"]

#: The built-in default's one key, so the README's SDK examples run against ``scripts/serve``
#: as written. It is there only while the gateway listens on a loopback address: on a host
#: others can reach, ``load_config`` leaves it out (a key everyone knows is no key).
DEV_KEY = "sk-dev-alice"

#: Only what the models do not default: every other field (server, storage, backend, health,
#: ...) is left to its model, so a default is written once.
DEFAULT_CONFIG = f"""
[anonymous]                # callers without a key are served, as the tier below

[tiers.anonymous]
requests = "10/minute"
tokens = "2000/minute"
concurrency = 1

[tiers.free]
requests = "60/minute"
tokens = "40000/minute; 1000000/day"
concurrency = 4
priority = 1

[tiers.pro]
requests = "300/minute"
tokens = "400000/minute"
concurrency = 16
priority = 10
default_max_tokens = 4096

[[keys]]                   # for development on this machine only (see DEV_KEY)
key = "{DEV_KEY}"
tier = "free"
name = "dev"
"""


def _rate_text(value: str) -> str:
    try:
        parse_rates(value)
    except ConfigError:
        raise ValueError('expected "N/unit" like "60/minute"') from None
    return value


def _cidrs(value: list[str]) -> list[str]:
    try:
        TrustedProxies(value)
    except ConfigError:
        raise ValueError("expected CIDRs like '10.0.0.0/8'") from None
    return value


def _http_url(url: str) -> str:
    if not re.match(r"^https?://[^/]", url):
        raise ValueError("expected an http:// or https:// URL")
    return url


def _existing_file(path: str | None) -> str | None:
    if path is not None and not Path(path).is_file():
        raise ValueError("no such file")
    return path


RateText = Annotated[str, AfterValidator(_rate_text)]


def _budget_text(value: str) -> str:
    try:
        parse_budgets(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


BudgetText = Annotated[str, AfterValidator(_budget_text)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    trusted_proxies: Annotated[list[str], AfterValidator(_cidrs)] = []
    max_body_bytes: int = Field(1_048_576, gt=0)
    max_header_bytes: int = Field(32_768, ge=1024)
    request_timeout_s: float = Field(30, gt=0)
    cors_allow_origins: list[str] = []
    tls_certfile: Annotated[str | None, AfterValidator(_existing_file)] = None
    tls_keyfile: Annotated[str | None, AfterValidator(_existing_file)] = None
    error_format: ErrorFormat = "openai"

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile: give both or neither (got one)")
        return self


class StorageConfig(_Section):
    url: str = "memory://"
    fallback: FallbackPolicy = "memory"
    fallback_share: float = Field(1.0, gt=0, le=1)
    timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, gt=0)
    prefix: str = DEFAULT_PREFIX
    overlimit_cache: bool = False

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        problem = scheme_error(url)
        if problem is not None:  # the URL is named masked: it may hold a password
            raise ValueError(f"{problem} (got {mask_url(url)!r})")
        return url

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise ValueError(problem.replace(", got", " (got") + ")")
        return prefix


class AdaptiveConfig(_Section):
    """``[backends.adaptive]``: each replica's concurrency follows the model server's load
    (``gateway/adaptive.py``), between ``min_concurrency`` and the backend's
    ``max_concurrency``."""

    min_concurrency: int = Field(2, ge=1)
    metrics_url: str = "auto"  # auto: <url without /v1>/metrics; a URL; "/path"; "" = none
    target_waiting: int = Field(0, ge=0)
    interval_ms: int = Field(500, ge=50, le=60_000)
    headroom: float = Field(0.1, ge=0, le=0.5)  # of each limit, kept for the top priority
    latency_tolerance: float = Field(2.0, gt=1)

    @field_validator("metrics_url")
    @classmethod
    def _url_or_path(cls, value: str) -> str:
        if value in ("", "auto") or value.startswith("/"):
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f'expected "auto", "", a path such as "/metrics" or an http(s) URL (got {value!r})'
            )
        return value


class _BackendFields(_Section):
    """What one model server (or each replica of one) is reached with and how hard."""

    kind: Literal["mock", "openai"] = "mock"
    api_key_env: str | None = None
    max_concurrency: int = Field(64, ge=1)
    queue_timeout_ms: int = Field(2000, ge=0)
    max_queued: int = Field(1000, ge=1)
    max_queue_wait_ms: int | None = Field(None, ge=0)  # then served before any priority
    adaptive: AdaptiveConfig | None = None
    mock_tokens_per_second: float = Field(0, ge=0)
    timeout_s: float = Field(600, gt=0)
    connect_timeout_s: float = Field(5, gt=0)

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> _BackendFields:
        adaptive = self.adaptive
        if adaptive is not None and adaptive.min_concurrency > self.max_concurrency:
            raise ValueError(
                f"adaptive.min_concurrency: at most max_concurrency = {self.max_concurrency} "
                f"(got {adaptive.min_concurrency})"
            )
        return self


class BackendConfig(_BackendFields):
    """The single ``[backend]`` table: one model server, every model, no health checks."""

    url: HttpUrl | None = None

    @model_validator(mode="after")
    def _url_for_openai(self) -> BackendConfig:
        if self.kind == "openai" and not self.url:
            raise ValueError('url: required when kind = "openai" (got None)')
        return self

    def as_fleet(self) -> FleetBackendConfig:
        """This table as the fleet's one backend: any model, one replica, never marked down."""
        return FleetBackendConfig(
            name=LEGACY_BACKEND,
            urls=[self.url] if self.url else [],
            models=[CATCH_ALL],
            health_interval_s=0,
            **self.model_dump(exclude={"url"}),
        )


#: The ``models`` entry of the backend that serves every model no other backend lists.
CATCH_ALL = "*"
#: The name the single ``[backend]`` table goes by in ``/health``, logs and metrics.
LEGACY_BACKEND = "default"


class FleetBackendConfig(_BackendFields):
    """One ``[[backends]]`` entry: replicas of the same models behind one queue."""

    name: str = Field(min_length=1)
    urls: list[HttpUrl] = []
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = {}
    health_interval_s: float = Field(5, ge=0)

    @model_validator(mode="after")
    def _urls_for_kind(self) -> FleetBackendConfig:
        if self.kind == "openai" and not self.urls:
            raise ValueError('urls: required when kind = "openai" (got [])')
        if self.kind == "mock" and self.urls:
            raise ValueError(f'urls: not allowed for kind = "mock" (got {self.urls!r})')
        url = self.adaptive.metrics_url if self.adaptive is not None else ""
        if "://" in url and len(self.urls) > 1:
            raise ValueError(
                "adaptive.metrics_url: one URL cannot be the metrics of several replicas; "
                f'use "auto" or a path such as "/metrics" (got {url!r})'
            )
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"urls: a replica listed twice (got {self.urls!r})")
        if self.models is not None and CATCH_ALL in self.models and len(self.models) > 1:
            raise ValueError(f'models: "*" stands alone (got {self.models!r})')
        for alias, target in self.aliases.items():
            if self.models is not None and alias in self.models:
                raise ValueError(
                    f"aliases.{alias}: the name of a model this backend serves (got {target!r})"
                )
        return self


class HealthConfig(_Section):
    requests: RateText = "600/minute"


class AdminConfig(_Section):
    """The admin API (``/admin/*``), off without this table: the admin key by its SHA-256, or
    the key itself in the environment variable ``key_env`` (read at start and on reload)."""

    key_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = []
    key_env: str | None = Field(None, min_length=1)
    usage_retention_days: int = Field(400, ge=1, le=3660)  # the usage ledger's

    @model_validator(mode="after")
    def _some_key(self) -> AdminConfig:
        if not self.key_sha256 and self.key_env is None:
            raise ValueError('give key_sha256 = ["<hex>"] or key_env = "VARIABLE" (got neither)')
        return self

    @property
    def digests(self) -> list[str]:
        return [digest.lower() for digest in self.key_sha256]


class AnonymousConfig(_Section):
    tier: str = "anonymous"


class ModelLimits(_Section):
    requests: RateText | None = None
    tokens: RateText | None = None


class TierConfig(_Section):
    requests: RateText | None = None
    tokens: RateText | None = None
    concurrency: int | None = Field(None, ge=1)
    priority: int = 0
    weight: float = Field(1, gt=0, le=1000)  # its clients' share of a backend's queue
    default_max_tokens: int = Field(1024, ge=1)
    shadow: bool = False
    models: dict[str, ModelLimits] = {}
    budget: BudgetText | None = None  # "$5/day; $50/month": USD per calendar period (UTC)
    unpriced: Literal["free", "refuse"] = "free"  # a model with no [prices] entry
    # What a request reserves for its answer: its whole cap, or the recent p95 of its
    # client's answers (what it may really generate is then enforced as it is produced).
    reserve: Literal["max_tokens", "estimate"] = "max_tokens"


class KeyConfig(_Section):
    key: str | None = Field(None, min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    tier: str
    name: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256 (got both or neither)")
        return self

    @property
    def digest(self) -> str:
        return self.sha256.lower() if self.sha256 else hash_api_key(self.key or "")


class PriceConfig(_Section):
    """A model's price in USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)

    @model_validator(mode="after")
    def _micro_dollars(self) -> PriceConfig:
        try:
            Price.of(self.input, self.output)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def price(self) -> Price:
        return Price.of(self.input, self.output)


class GatewayConfig(_Section):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    backend: BackendConfig = BackendConfig()
    backends: list[FleetBackendConfig] = []
    health: HealthConfig = HealthConfig()
    anonymous: AnonymousConfig | None = None
    admin: AdminConfig | None = None
    tiers: dict[str, TierConfig] = {}
    keys: list[KeyConfig] = []
    prices: dict[str, PriceConfig] = {}  # by model name, as clients ask for it
    shadow: bool = False
    log_level: LogLevel = "info"

    @property
    def fleet(self) -> list[FleetBackendConfig]:
        """The backends requests are routed to: ``[[backends]]``, or the ``[backend]`` table."""
        return list(self.backends) or [self.backend.as_fleet()]


# QUOTAGATE_<SECTION>_<FIELD> for every scalar of these sections, plus a few short aliases.
_ENV_SECTIONS: dict[str, type[_Section]] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "backend": BackendConfig,
    "health": HealthConfig,
}
_ENV_ALIASES = {
    "QUOTAGATE_HOST": ("server", "host"),
    "QUOTAGATE_PORT": ("server", "port"),
    "QUOTAGATE_BACKEND": ("backend", "kind"),
    "QUOTAGATE_LOG_LEVEL": (None, "log_level"),
    "QUOTAGATE_SHADOW": (None, "shadow"),
}


def env_name(section: str, field: str) -> str:
    """The variable that sets ``section.field`` (``""``: a top-level field):
    ``QUOTAGATE_SERVER_PORT``, ``QUOTAGATE_LOG_LEVEL``."""
    return (
        f"QUOTAGATE_{section.upper()}_{field.upper()}" if section else f"QUOTAGATE_{field.upper()}"
    )


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for section, model in _ENV_SECTIONS.items():
        for field in model.model_fields:
            name = env_name(section, field)
            if name in environ:
                value: Any = environ[name]
                if field == "trusted_proxies":
                    value = [part.strip() for part in value.split(",") if part.strip()]
                found.setdefault(section, {})[field] = value
    for alias, (alias_section, alias_field) in _ENV_ALIASES.items():
        if alias in environ:
            found.setdefault(alias_section or "", {})[alias_field] = environ[alias]
    return found


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> GatewayConfig:
    """Read, merge and validate the configuration.

    Args:
        path: a TOML file; None uses ``DEFAULT_CONFIG``.
        environ: where ``QUOTAGATE_*`` variables are read (``os.environ`` by default).
        overrides: CLI flags as ``{"server": {"port": 9000}}``; ``""`` for top-level fields.

    Raises:
        ConfigError: with one ``field.path: problem (got X)`` line per error.
    """
    if path is None:
        data = tomllib.loads(DEFAULT_CONFIG)
    else:
        try:
            data = tomllib.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: no such file (got {str(path)!r})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: not valid TOML: {exc} (got {str(path)!r})") from None
    problems: list[str] = []
    if "backend" in data and "backends" in data:  # the file's own tables, before env and flags
        problems.append(
            "backends: give one [backend] table or [[backends]] entries, not both "
            "(got both; move the [backend] table into [[backends]] with a name)"
        )
    for layer in (_env_overrides(os.environ if environ is None else environ), overrides or {}):
        for section, values in layer.items():
            target = data if section == "" else data.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{section}: expected a table (got {target!r})")
            target.update(values)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems += (describe_error(error) for error in exc.errors())
    problems += _reference_problems(data)
    if problems:
        raise ConfigError("\n".join(problems))
    admin = config.admin
    if admin is not None and admin.key_env is not None:
        secret = (os.environ if environ is None else environ).get(admin.key_env, "")
        if not secret:
            raise ConfigError(f"admin.key_env: the variable {admin.key_env} is not set (got none)")
        hashed = admin.model_copy(update={"key_sha256": [*admin.key_sha256, hash_api_key(secret)]})
        config = config.model_copy(update={"admin": hashed})
    if config.admin is not None:
        clients = [i for i, key in enumerate(config.keys) if key.digest in config.admin.digests]
        if clients:
            raise ConfigError(
                f"keys[{clients[0]}]: the admin key cannot also be a client key (got the same "
                "key in [admin] and [[keys]])"
            )
    if path is None and not is_loopback(config.server.host):
        config = config.model_copy(update={"keys": [k for k in config.keys if k.key != DEV_KEY]})
    return config


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _reference_problems(data: Mapping[str, Any]) -> list[str]:
    """Cross-field checks, run on the raw data so they are reported beside field errors."""
    raw_tiers, raw_keys = data.get("tiers"), data.get("keys")
    tiers: dict[str, Any] = raw_tiers if isinstance(raw_tiers, dict) else {}
    keys: list[Any] = raw_keys if isinstance(raw_keys, list) else []
    problems = []
    digests: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            continue
        tier = key.get("tier")
        if isinstance(tier, str) and tier not in tiers:
            problems.append(
                f"keys[{i}].tier: unknown tier, expected one of {sorted(tiers)} (got {tier!r})"
            )
        secret = key.get("sha256") or (
            hash_api_key(key["key"]) if isinstance(key.get("key"), str) else None
        )
        if isinstance(secret, str):
            if secret.lower() in digests:
                problems.append(
                    f"keys[{i}]: the same key as keys[{digests[secret.lower()]}] (got a duplicate)"
                )
            digests.setdefault(secret.lower(), i)
    problems += _fleet_problems(data.get("backends"))
    anonymous = data.get("anonymous")
    if isinstance(anonymous, dict):
        tier = anonymous.get("tier", "anonymous")
        if tier not in tiers:
            problems.append(
                f"anonymous.tier: unknown tier, expected one of {sorted(tiers)} (got {tier!r})"
            )
    return problems


def _fleet_problems(raw: Any) -> list[str]:
    """Across ``[[backends]]``: names once, each model and alias served by one backend, one
    catch-all."""
    problems = []
    names: dict[str, int] = {}
    served: dict[str, str] = {}  # a model or alias -> where it is first served
    catch_all: int | None = None
    for i, backend in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(backend, dict):
            continue
        name = backend.get("name")
        if isinstance(name, str):
            if name in names:
                problems.append(
                    f"backends[{i}].name: the same name as backends[{names[name]}] (got {name!r})"
                )
            names.setdefault(name, i)
        models = backend.get("models")
        for j, model in enumerate(models if isinstance(models, list) else []):
            if not isinstance(model, str):
                continue
            if model == CATCH_ALL:
                if catch_all is not None:
                    problems.append(
                        f'backends[{i}].models[{j}]: "*" is already the catch-all of '
                        f"backends[{catch_all}] (got {model!r})"
                    )
                catch_all = i if catch_all is None else catch_all
                continue
            where = f"backends[{i}].models[{j}]"
            if model in served:
                problems.append(f"{where}: also served by {served[model]} (got {model!r})")
            served.setdefault(model, where)
        aliases = backend.get("aliases")
        for alias in aliases if isinstance(aliases, dict) else {}:
            where = f"backends[{i}].aliases.{alias}"
            if alias in served and not served[alias].startswith(f"backends[{i}].models"):
                problems.append(
                    f"{where}: collides with the model or alias of {served[alias]} (got {alias!r})"
                )
            served.setdefault(alias, where)
    return problems


_SUBPATH = re.compile(r"^[\w\[\]*-]+(?:\.[\w\[\]*-]+)*: ")


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``field.path: problem (got X)``."""
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        return f"{path}: required field missing"
    if "(got " in message:  # a validator that names its own sub-paths and values
        lines = []
        for line in message.splitlines():
            if _SUBPATH.match(line):
                lines.append(f"{path}.{line}" if path else line)
            else:
                lines.append(f"{path}: {line}" if path else line)
        return "\n".join(lines)
    return f"{path}: {message} (got {error.get('input')!r})"


def config_digest(config: GatewayConfig) -> str:
    """A short fingerprint of the effective configuration (for logs and evidence records)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def configured_storage(config: GatewayConfig) -> Storage:
    """The storage the ``[storage]`` table describes (``serve``, ``reset`` and ``verify``)."""
    s = config.storage
    # Only what the config sets explicitly: the URL's own ?prefix=, ?timeout_ms=, ... stand
    # unless the [storage] table overrides them.
    given = s.model_fields_set
    return storage_from_url(
        s.url,
        fallback=s.fallback if "fallback" in given else None,
        fallback_share=s.fallback_share if "fallback_share" in given else None,
        timeout=s.timeout_ms / 1000 if "timeout_ms" in given else None,
        prefix=s.prefix if "prefix" in given else None,
    )

"""Who is calling, and which limits their request is checked against.

``Callers.identify`` is the one identification of the gateway (inference, ``/v1/ratelimit``,
``/health`` and ``quotagate reset`` all go through it): a configured API key (``X-API-Key`` or
``Authorization: Bearer``) is its tier's caller, counted under the key's hash; no key is the
anonymous tier, counted by client address (trusted proxies honoured); anything else is refused.
A key issued through the admin API (``tenants``) is found in the replica's table, checked for
revocation, expiry and a rotation's grace, and counted under its id, so a rotated secret keeps
its counters; its tier may carry the key's own limits and model allow-list.
``limits`` turns a tier, a client, a model and a reservation into the engine's hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from fastapi.responses import Response
from starlette.types import Scope

from ..http import NO_RETRY
from ..identity import TrustedProxies, bearer_or_header_key, hash_api_key, mask_key
from ..keys import (
    BUDGET,
    CONCURRENCY,
    REQUESTS,
    TOKENS,
    client_state_key,
    ip_client_id,
    key_client_id,
    model_limit,
)
from ..limiter import Acquire, Hit
from ..rates import Rate, parse_rates
from .budgets import Budget, parse_budgets
from .config import GatewayConfig, TierConfig
from .responses import Errors
from .tenants import ApiKey, Tenants

__all__ = [
    "Caller",
    "Callers",
    "Limits",
    "Refusal",
    "Tier",
    "api_key_client",
    "key_client_id_of_issued",
    "limits",
]


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier's limits, parsed once per config."""

    name: str
    requests: tuple[Rate, ...] | None
    tokens: tuple[Rate, ...] | None
    concurrency: int | None
    priority: int
    weight: float
    default_max_tokens: int
    shadow: bool
    model_requests: dict[str, tuple[Rate, ...]]
    model_tokens: dict[str, tuple[Rate, ...]]
    budgets: tuple[Budget, ...] = ()  # micro-dollars per calendar period
    unpriced: str = "free"  # a model with no price: "free" or "refuse"
    reserve: str = "max_tokens"  # or "estimate": the recent p95 of the client's answers

    @property
    def budget_rates(self) -> tuple[Rate, ...]:
        return tuple(budget.rate for budget in self.budgets)

    @classmethod
    def from_config(cls, name: str, tier: TierConfig, shadow: bool) -> Tier:
        return cls(
            name=name,
            requests=parse_rates(tier.requests) if tier.requests else None,
            tokens=parse_rates(tier.tokens) if tier.tokens else None,
            concurrency=tier.concurrency,
            priority=tier.priority,
            weight=tier.weight,
            default_max_tokens=tier.default_max_tokens,
            shadow=shadow or tier.shadow,
            model_requests={
                m: parse_rates(v.requests) for m, v in tier.models.items() if v.requests
            },
            model_tokens={m: parse_rates(v.tokens) for m, v in tier.models.items() if v.tokens},
            budgets=parse_budgets(tier.budget) if tier.budget else (),
            unpriced=tier.unpriced,
            reserve=tier.reserve,
        )

    def describe(self) -> str:
        """``free[60/minute req, 40000/minute tok, 4 conc, $5.00/day]`` for the start-up line."""
        spend = "".join(f", {budget}" for budget in self.budgets)
        return (
            f"{self.name}[{_rates_text(self.requests)} req, {_rates_text(self.tokens)} tok, "
            f"{self.concurrency or '∞'} conc{spend}]"
        )


@dataclass(frozen=True, slots=True)
class Caller:
    tier: Tier
    client: str  # ``key:<hash>``, ``key:<id>`` or ``ip:<address>``: the hash tag of its keys
    display: str  # masked, for logs
    key_id: str | None = None  # an issued key's id
    models: frozenset[str] | None = None  # an issued key's allow-list


@dataclass(frozen=True, slots=True)
class Refusal:
    """A caller the gateway does not serve (401), still known by ``client`` (its address),
    which is how an endpoint open to everyone (``/health``) counts it."""

    code: str
    message: str
    client: str

    def response(self, errors: Errors) -> Response:
        return errors.response(
            401, self.code, self.message, [NO_RETRY]
        )  # a key does not get better


class Limits(NamedTuple):
    """The engine's view of a request: what it is charged (``requests`` cost 1, ``tokens``
    the reservation, ``money`` its cost bound in micro-dollars) and the concurrency slot it
    holds."""

    requests: list[Hit]
    tokens: list[Hit]
    acquire: Acquire | None
    money: list[Hit]

    @property
    def hits(self) -> list[Hit]:
        return self.requests + self.tokens + self.money


def api_key_client(api_key: str) -> str:
    """The client id an API key is counted under."""
    return key_client_id(hash_api_key(api_key))


class Callers:
    """The tiers, keys and anonymous access of one config."""

    def __init__(self, config: GatewayConfig, tenants: Tenants | None = None) -> None:
        self.tenants = tenants
        self._tier_configs = config.tiers
        self._shadow = config.shadow
        self._issued_tiers: dict[tuple[str, int, str], Tier] = {}
        # Issued keys seen on the wire -> (table generation, valid until, caller): a known key
        # costs no SHA-256 and no Caller built while the table has not changed.
        self._issued_seen: dict[str, tuple[int, float, Caller]] = {}
        self.tiers = {
            name: Tier.from_config(name, tier, config.shadow) for name, tier in config.tiers.items()
        }
        self.keys = {key.digest: self.tiers[key.tier] for key in config.keys}
        self.anonymous = self.tiers[config.anonymous.tier] if config.anonymous else None
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        # Configured keys seen on the wire -> their caller: saves a SHA-256 per request.
        self._known: dict[str, Caller] = {}

    def identify(self, scope: Scope) -> Caller | Refusal:
        api_key = bearer_or_header_key(scope)
        if api_key:
            caller = self._known.get(api_key)
            if caller is not None:
                return caller
            seen = self._issued_seen.get(api_key)
            if seen is not None and self.tenants is not None:
                generation, until, caller = seen
                if generation == self.tenants.generation and self.tenants.clock() < until:
                    self.tenants.used(caller.key_id or "")
                    return caller
            digest = hash_api_key(api_key)
            tier = self.keys.get(digest)
            if tier is None:
                issued = self.tenants.lookup(digest) if self.tenants is not None else None
                if issued is not None:
                    found = self._issued(issued, digest, scope)
                    if isinstance(found, Caller):
                        self._remember_issued(api_key, issued, digest, found)
                    return found
                return Refusal("invalid_api_key", "The API key is not valid.", self.address(scope))
            caller = Caller(tier, key_client_id(digest), mask_key(api_key))
            if len(self._known) < 4 * len(self.keys):  # configured keys only: bounded
                self._known[api_key] = caller
            return caller
        client = self.address(scope)
        if self.anonymous is None:
            return Refusal(
                "missing_api_key",
                "An API key is required: send X-API-Key or Authorization: Bearer <key>.",
                client,
            )
        return Caller(self.anonymous, client, client)

    async def identify_issued(self, scope: Scope) -> Caller | Refusal:
        """``identify`` for a key the replica's table does not know: asks the store (a key
        created on another replica a moment ago)."""
        api_key = bearer_or_header_key(scope)
        issued, digest = None, ""
        if api_key and self.tenants is not None:
            digest = hash_api_key(api_key)
            issued = await self.tenants.find(digest)
        if issued is None:
            return Refusal("invalid_api_key", "The API key is not valid.", self.address(scope))
        return self._issued(issued, digest, scope)

    def _issued(self, key: ApiKey, digest: str, scope: Scope) -> Caller | Refusal:
        assert self.tenants is not None
        state = key.state(digest, self.tenants.clock())
        if state == "revoked":
            return Refusal("revoked_api_key", "The API key has been revoked.", self.address(scope))
        if state == "expired":
            return Refusal("expired_api_key", "The API key has expired.", self.address(scope))
        tier = self._issued_tier(key)
        if tier is None:
            message = f"The API key's tier {key.tier!r} is not in the config."
            return Refusal("invalid_api_key", message, self.address(scope))
        self.tenants.used(key.id)
        models = frozenset(key.models) if key.models is not None else None
        return Caller(tier, key_client_id_of_issued(key.id), key.masked, key.id, models)

    def _remember_issued(self, api_key: str, key: ApiKey, digest: str, caller: Caller) -> None:
        """Remember ``caller`` for ``api_key`` until the table changes or the key's time is
        up (its expiry, its revocation, the end of an old secret's grace)."""
        assert self.tenants is not None
        if len(self._issued_seen) >= _ISSUED_SEEN:
            self._issued_seen.clear()
        until = key.valid_until(digest)
        self._issued_seen[api_key] = (self.tenants.generation, until, caller)

    def _issued_tier(self, key: ApiKey) -> Tier | None:
        """The key's tier with the key's own limits over it (parsed once per change)."""
        cache_key = (key.id, key.rev, key.tier)
        tier = self._issued_tiers.get(cache_key)
        if tier is None:
            base = self._tier_configs.get(key.tier)
            if base is None:
                return None
            if len(self._issued_tiers) > 100_000:
                self._issued_tiers.clear()
            own = {name: value for name, value in key.limits.items() if value is not None}
            config = base.model_copy(update=own) if own else base
            tier = self._issued_tiers[cache_key] = Tier.from_config(key.tier, config, self._shadow)
        return tier

    def address(self, scope: Scope) -> str:
        """The client id of the request's address (``ip:<address>``, trusted proxies honoured)."""
        return ip_client_id(self.trusted.client_host(scope))


#: Most issued keys' callers remembered (each by its secret) before the memo starts over.
_ISSUED_SEEN = 100_000


def key_client_id_of_issued(key_id: str) -> str:
    """The client id an issued key is counted under: its id, not its secret (a rotation keeps
    the counters)."""
    return "key:" + key_id


def limits(
    tier: Tier,
    client: str,
    model: str | None,
    reserved: int,
    lease_ttl: float,
    *,
    read: bool = False,
    money: int = 0,
) -> Limits:
    """Every limit a request of ``tier`` from ``client`` to ``model`` is checked against:
    one request, ``reserved`` tokens (held until the answer says what was used) and a
    concurrency slot for ``lease_ttl`` seconds at most, and ``money`` micro-dollars of the
    tier's budgets. ``read``: nothing consumed, each limit's state only (``/v1/ratelimit``)."""
    cost = 0 if read else 1
    reserved = 0 if read else reserved
    requests: list[Hit] = []
    tokens: list[Hit] = []
    if tier.requests:
        requests.append(_hit(client, REQUESTS, tier.requests, cost))
    if tier.tokens:
        tokens.append(_hit(client, TOKENS, tier.tokens, reserved))
    if model is not None:
        if model in tier.model_requests:
            name = model_limit("requests", model)
            requests.append(_hit(client, name, tier.model_requests[model], cost))
        if model in tier.model_tokens:
            name = model_limit("tokens", model)
            tokens.append(_hit(client, name, tier.model_tokens[model], reserved))
    acquire = (
        Acquire(client_state_key(client, CONCURRENCY), tier.concurrency, 0 if read else lease_ttl)
        if tier.concurrency
        else None
    )
    spent: list[Hit] = []
    if tier.budgets:
        key = client_state_key(client, BUDGET)
        spent.append(Hit(key, tier.budget_rates, 0 if read else money, "calendar", BUDGET))
    return Limits(requests, tokens, acquire, spent)


def _hit(client: str, name: str, rates: tuple[Rate, ...], cost: int) -> Hit:
    return Hit(client_state_key(client, name), rates, cost, name=name)


def _rates_text(rates: tuple[Rate, ...] | None) -> str:
    return "; ".join(str(rate) for rate in rates) if rates else "∞"

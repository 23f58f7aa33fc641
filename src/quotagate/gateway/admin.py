"""The admin API (``[admin]``): API keys created, listed, changed, revoked and rotated at run
time, for every replica at once (see ``tenants``).

Off without ``[admin]``: every ``/admin/*`` path is a 404. With it, a request carries the admin
key as ``Authorization: Bearer``, compared by its SHA-256 in constant time; a wrong or missing
one is ``401 invalid_admin_key``, and more than 10 failures a minute from one client address
are answered 429 before the key is even looked at. Answers are JSON; errors are the flat
``{"error": <code>, "message": ...}`` (this is no OpenAI endpoint). A new secret is shown once,
in the answer that made it; only its SHA-256 is stored. Keys of the config file are listed,
read-only (409 on a change).
"""

from __future__ import annotations

import hmac
import math
import re
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast, get_args

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..identity import bearer_or_header_key, hash_api_key, mask_key
from ..keys import client_state_key, key_client_id
from ..limiter import Hit
from ..rates import parse_rates
from .body import read_json
from .callers import key_client_id_of_issued
from .config import BudgetText, RateText, describe_error
from .responses import Errors
from .tenants import ApiKey, Tenants, new_key_id, new_secret
from .usage import GroupBy, days, rows, usage_key

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["ADMIN_ERRORS", "Admin"]

#: What an admin body may weigh: a key's fields, not a file.
MAX_BODY = 65_536
#: Longest rotation grace: a month.
MAX_GRACE_S = 30 * 86_400
_ID = re.compile(r"^(key|cfg)_[0-9a-f]{16}$")
_FAILURES = parse_rates("10/minute")
#: Most days and account-days one usage query reads.
_MAX_DAYS = 400
_MAX_READS = 100_000
#: Replaced secrets a key remembers (as revoked once their grace ends).
_KEPT_SECRETS = 10
#: The admin API's error shape: flat, as the seed tutorial's (it is no OpenAI endpoint).
ADMIN_ERRORS = _ERRORS = Errors("tutorial")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


_B = TypeVar("_B", bound=_Body)
ModelName = Annotated[str, Field(min_length=1, max_length=200)]


class KeyLimits(_Body):
    """A key's own limits, over its tier's."""

    requests: RateText | None = None
    tokens: RateText | None = None
    concurrency: int | None = Field(None, ge=1)
    weight: float | None = Field(None, gt=0, le=1000)  # its share of a backend's queue
    budget: BudgetText | None = None  # "$500/month": over its tier's (what was spent stays)


class NewKey(_Body):
    tier: str
    name: str | None = Field(None, max_length=200)
    expires_at: datetime | None = None
    limits: KeyLimits | None = None
    models: list[ModelName] | None = None


class KeyChange(_Body):
    tier: str | None = None
    name: str | None = Field(None, max_length=200)
    expires_at: datetime | None = None
    limits: KeyLimits | None = None
    models: list[ModelName] | None = None


class Rotation(_Body):
    grace_s: float = Field(0, ge=0, le=MAX_GRACE_S)


def iso(moment: float | None) -> str | None:
    """Epoch seconds as ``2027-01-01T00:00:00Z``."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class Admin:
    """The ``/admin/*`` endpoints of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    # -- the endpoints -------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        parsed = await self._body(request, NewKey)
        if isinstance(parsed, Response):
            return parsed
        problem = self._tier_problem(parsed.tier)
        if problem is not None:
            return problem
        tenants = self._tenants()
        secret, now = new_secret(), tenants.clock()
        key = ApiKey(
            id=new_key_id(),
            digest=hash_api_key(secret),
            tier=parsed.tier,
            masked=mask_key(secret),
            created_at=now,
            name=parsed.name,
            expires_at=_epoch(parsed.expires_at),
            limits=_limits(parsed.limits),
            models=parsed.models,
        )
        await self._save(key)
        return JSONResponse({**self._public(key), "key": secret}, status_code=201)

    async def index(self, request: Request) -> Response:
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        store = self._tenants().store
        used = await store.last_used()
        _, keys = await store.load()
        issued = sorted(keys, key=lambda k: (k.created_at, k.id))
        rows = [self._public(key, used) for key in issued]
        return JSONResponse({"object": "list", "data": self._config_keys() + rows})

    async def show(self, request: Request, key_id: str) -> Response:
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        found = await self._find(key_id)
        if isinstance(found, Response):
            return found
        if isinstance(found, dict):
            return JSONResponse(found)
        used = await self._tenants().store.last_used()
        return JSONResponse(self._public(found, used))

    async def update(self, request: Request, key_id: str) -> Response:
        changing = await self._changing(request, key_id)
        if isinstance(changing, Response):
            return changing
        found, previous = changing
        parsed = await self._body(request, KeyChange)
        if isinstance(parsed, Response):
            return parsed
        given = parsed.model_fields_set
        if "tier" in given:
            if parsed.tier is None:
                return _invalid("tier: a key needs a tier (got None)")
            problem = self._tier_problem(parsed.tier)
            if problem is not None:
                return problem
            found.tier = parsed.tier
        if "name" in given:
            found.name = parsed.name
        if "expires_at" in given:
            found.expires_at = _epoch(parsed.expires_at)
        if "limits" in given:
            found.limits = _limits(parsed.limits)
        if "models" in given:
            found.models = parsed.models
        await self._save(found, previous=previous)
        return JSONResponse(self._public(found))

    async def revoke(self, request: Request, key_id: str) -> Response:
        changing = await self._changing(request, key_id)
        if isinstance(changing, Response):
            return changing
        found, previous = changing
        if found.revoked_at is None:
            found.revoked_at = self._tenants().clock()
            await self._save(found, previous=previous)
        return JSONResponse(self._public(found))

    async def rotate(self, request: Request, key_id: str) -> Response:
        changing = await self._changing(request, key_id)
        if isinstance(changing, Response):
            return changing
        found, previous = changing
        if found.revoked_at is not None:
            return _ERRORS.response(409, "revoked_api_key", f"The key {key_id} is revoked.")
        parsed = await self._body(request, Rotation, empty_ok=True)
        if isinstance(parsed, Response):
            return parsed
        secret = new_secret()
        # The old secret stays known, so that once its grace ends it is told it was revoked.
        found.previous.append((found.digest, self._tenants().clock() + parsed.grace_s))
        dropped = tuple(digest for digest, _ in found.previous[:-_KEPT_SECRETS])
        found.previous = found.previous[-_KEPT_SECRETS:]
        found.digest, found.masked = hash_api_key(secret), mask_key(secret)
        await self._save(found, dropped, previous)
        return JSONResponse({**self._public(found), "key": secret})

    async def usage(self, request: Request) -> Response:
        """``GET /admin/usage?key=ID&from=DAY&to=DAY&group_by=day|model|key``: the ledger's
        rows (every account without ``key``; today without ``from`` / ``to``)."""
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        book = self.gateway.ledger.usage
        assert book is not None
        query = request.query_params
        unknown = sorted(set(query) - {"key", "from", "to", "group_by"})
        if unknown:
            return _invalid(f"{unknown[0]}: unknown parameter (got {query[unknown[0]]!r})")
        group_by = query.get("group_by", "day")
        if group_by not in get_args(GroupBy):
            return _invalid(f"group_by: expected day, model or key (got {group_by!r})")
        span = _span(query.get("from"), query.get("to"), book.today())
        if isinstance(span, Response):
            return span
        accounts = await self._accounts(query.get("key"))
        if isinstance(accounts, Response):
            return accounts
        wanted = [(account, client, day) for account, client in accounts for day in span]
        if len(wanted) > _MAX_READS:
            return _invalid(f"from, to: {len(wanted)} account-days to read, at most {_MAX_READS}")
        read = await self.gateway.limiter.tallies([usage_key(c, day) for _, c, day in wanted])
        found = [
            (account, day, counts) for (account, _, day), counts in zip(wanted, read, strict=True)
        ]
        return JSONResponse(
            {
                "object": "list",
                "group_by": group_by,
                "from": span[0].isoformat(),
                "to": span[-1].isoformat(),
                "data": rows(found, cast(GroupBy, group_by)),
            }
        )

    async def _accounts(self, key_id: str | None) -> list[tuple[str, str]] | Response:
        """``(account, client)`` of ``key_id`` (a key's id or ``tier:<name>``), or of all."""
        tiers = [("tier:" + name, "tier:" + name) for name in sorted(self.gateway.callers.tiers)]
        configured = [
            ("cfg_" + key.digest[:16], key_client_id(key.digest))
            for key in self.gateway.config.keys
        ]
        if key_id is None:
            _, issued = await self._tenants().store.load()
            mine = [(key.id, key_client_id_of_issued(key.id)) for key in issued]
            return configured + sorted(mine) + tiers
        for account, client in (*configured, *tiers):
            if account == key_id:
                return [(account, client)]
        if _ID.match(key_id) and await self._tenants().store.get(key_id) is not None:
            return [(key_id, key_client_id_of_issued(key_id))]
        shown = key_id if len(key_id) <= 80 else key_id[:80] + "…"
        return _ERRORS.response(404, "key_not_found", f"No key or tier has the id {shown!r}.")

    # -- the parts -----------------------------------------------------------------------------

    async def _authorize(self, request: Request) -> Response | None:
        """None when the request carries the admin key; else the 404, 401 or 429."""
        gateway = self.gateway
        admin = gateway.config.admin
        if admin is None or gateway.tenants is None:
            path = request.url.path
            return _ERRORS.response(404, "not_found", f"Not Found: {request.method} {path}")
        client = gateway.callers.address(request.scope)  # by address: the key is unknown yet
        failures = Hit(client_state_key(client, "admin_failures"), _FAILURES, 0, name="admin")
        seen = await gateway.limiter.hit_many([failures])
        if seen.states and seen.states[0].remaining == 0:
            state = seen.states[0]  # full: one failure more is forgotten an interval after
            interval = _FAILURES[0].period / state.limit
            wait = max(1, math.ceil(state.reset_after - (state.limit - 1) * interval))
            return _ERRORS.response(
                429,
                "too_many_admin_failures",
                "More than 10 failed admin requests in a minute from this address.",
                [(b"retry-after", str(wait).encode())],
                retry_after=wait,
            )
        offered = bearer_or_header_key(request.scope)
        digest = hash_api_key(offered) if offered else ""
        if any(hmac.compare_digest(digest, known) for known in admin.digests) and offered:
            return None
        await gateway.limiter.hit_many([failures._replace(cost=1)])
        return _ERRORS.response(401, "invalid_admin_key", "The admin key is missing or not valid.")

    def _tenants(self) -> Tenants:
        assert self.gateway.tenants is not None
        return self.gateway.tenants

    async def _body(
        self, request: Request, model: type[_B], *, empty_ok: bool = False
    ) -> _B | Response:
        scope = request.scope
        if empty_ok and not _has_body(scope["headers"]):
            return model()
        read = await read_json(scope, request.receive, MAX_BODY, _ERRORS)
        if isinstance(read, Response):
            return read
        body, _ = read
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            return _invalid("\n".join(describe_error(error) for error in exc.errors()))

    def _tier_problem(self, tier: str) -> Response | None:
        tiers = sorted(self.gateway.callers.tiers)
        if tier in tiers:
            return None
        return _invalid(f"tier: unknown tier, expected one of {tiers} (got {tier!r})")

    async def _find(self, key_id: str) -> ApiKey | dict[str, Any] | Response:
        """The issued key (from the store: another replica may have made it a moment ago),
        or a config key's listing, or the 404."""
        if _ID.match(key_id):
            if key_id.startswith("cfg_"):
                for row in self._config_keys():
                    if row["id"] == key_id:
                        return row
            else:
                found = await self._tenants().store.get(key_id)
                if found is not None:
                    return found
        shown = key_id if len(key_id) <= 80 else key_id[:80] + "…"
        return _ERRORS.response(404, "key_not_found", f"No key has the id {shown!r}.")

    async def _changing(self, request: Request, key_id: str) -> tuple[ApiKey, str] | Response:
        """For a change: the admin key checked, the issued key and its record as read (the
        change is written only if it is still that)."""
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        found = await self._issued(key_id)
        if isinstance(found, Response):
            return found
        return found, found.to_json()

    async def _issued(self, key_id: str) -> ApiKey | Response:
        found = await self._find(key_id)
        if isinstance(found, dict):
            return _ERRORS.response(
                409,
                "config_key",
                f"The key {key_id} comes from the config file: change it there (and reload).",
            )
        return found

    async def _save(
        self, key: ApiKey, dropped: tuple[str, ...] = (), previous: str | None = None
    ) -> None:
        key.rev += 1
        tenants = self._tenants()
        await tenants.store.save(key, dropped, previous)
        await tenants.refresh()  # this replica at once; the others within refresh_s

    def _public(self, key: ApiKey, used: dict[str, float] | None = None) -> dict[str, Any]:
        return {
            "id": key.id,
            "name": key.name,
            "tier": key.tier,
            "masked": key.masked,
            "created_at": iso(key.created_at),
            "expires_at": iso(key.expires_at),
            "revoked_at": iso(key.revoked_at),
            "last_used_at": iso((used or {}).get(key.id)),
            "source": key.source,
            "limits": key.limits,
            "models": key.models,
        }

    def _config_keys(self) -> list[dict[str, Any]]:
        return [
            {
                "id": "cfg_" + key.digest[:16],
                "name": key.name,
                "tier": key.tier,
                "masked": mask_key(key.key) if key.key else "sha256:" + key.digest[:8] + "…",
                "created_at": None,
                "expires_at": None,
                "revoked_at": None,
                "last_used_at": None,
                "source": "config",
                "limits": {},
                "models": None,
            }
            for key in self.gateway.config.keys
        ]


def _span(start: str | None, end: str | None, today: date) -> list[date] | Response:
    """The days from ``start`` to ``end`` (ISO dates; today when not given)."""
    parsed: list[date] = []
    for name, text in (("from", start), ("to", end)):
        if text is None:
            parsed.append(today)
            continue
        try:
            parsed.append(date.fromisoformat(text))
        except ValueError:
            return _invalid(f"{name}: expected a date like 2026-12-01 (got {text!r})")
    first, last = parsed
    if start is not None and end is None:
        last = max(first, today)
    if first > last:
        return _invalid(f"from: after to (got {first.isoformat()} > {last.isoformat()})")
    if (last - first).days >= _MAX_DAYS:
        return _invalid(f"from, to: at most {_MAX_DAYS} days (got {(last - first).days + 1})")
    return days(first, last)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding"
        for name, value in headers
    )


def _limits(limits: KeyLimits | None) -> dict[str, Any]:
    return limits.model_dump(exclude_none=True) if limits is not None else {}


def _invalid(message: str) -> Response:
    return _ERRORS.response(400, "invalid_request", message)

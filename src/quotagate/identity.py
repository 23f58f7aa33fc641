"""Who is calling: an API key (hashed) or the client's IP address.

Proxy headers follow uvicorn's trusted-proxy rules: trust nothing by default; ``X-Forwarded-For``
and ``Forwarded`` (RFC 7239) count only when the direct peer is a trusted proxy, and the chain is
read right to left to the first hop that is not trusted — hops left of it are client-supplied and
can be forged.

Key functions take a request object with a ``scope`` (a Starlette ``Request`` or anything like
it) and return the client key. Built-in ones return ``key:<sha256 prefix>`` or ``ip:<address>``:
the raw API key never reaches storage or logs.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from .errors import ConfigError
from .keys import ip_client_id, key_client_id

__all__ = [
    "ClientKey",
    "KeyFunc",
    "TrustedProxies",
    "api_key_or_ip",
    "bearer_or_header_key",
    "client_ip",
    "display_key",
    "get_remote_address",
    "hash_api_key",
    "mask_key",
    "settled_key",
    "storage_id",
    "with_trusted_proxies",
]

logger = logging.getLogger("quotagate")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HasScope(Protocol):
    @property
    def scope(self) -> Mapping[str, Any]: ...


KeyFunc = Callable[[Any], "str | Awaitable[str]"]


class ClientKey(str):
    """A client key made by a built-in key function: safe to store as it is (not hashed again)
    and shown masked in logs (``masked``).

    Made afresh per request from a remembered plain str: an instance of a str subclass is
    tracked by the garbage collector, and a cache of one per client would make every
    collection walk them all.
    """

    __slots__ = ()

    @property
    def masked(self) -> str:
        secret = _SECRETS.get(self)
        return mask_key(secret) if secret is not None else str(self)


def hash_api_key(api_key: str) -> str:
    """Hex SHA-256 of an API key: what configs store and what is compared."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def mask_key(secret: str) -> str:
    """``sk-live-abcdef1234`` -> ``sk-…1234``: enough to tell keys apart, not to use one."""
    if secret.startswith(("ip:", "key:")):
        return secret
    head = secret.split("-", 1)[0] + "-" if "-" in secret[:8] else ""
    tail = secret[-4:] if len(secret) >= 12 else secret[-2:] if len(secret) >= 6 else ""
    return f"{head}…{tail}"


class TrustedProxies:
    """A set of CIDRs parsed once; ``client_host`` resolves the real client of a request.

    Args:
        networks: CIDRs or addresses (``"10.0.0.0/8"``, ``"::1"``); ``"*"`` trusts every peer
            (only for a server reachable solely through the proxy).
    """

    __slots__ = ("_all", "_networks")

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._all = False
        parsed: list[_Network] = []
        for item in networks:
            if item.strip() == "*":
                self._all = True
                continue
            try:
                parsed.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies: expected a CIDR like '10.0.0.0/8', got {item!r}"
                ) from None
        self._networks = tuple(parsed)

    def __bool__(self) -> bool:
        return self._all or bool(self._networks)

    def trusts(self, host: str) -> bool:
        if self._all:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def client_host(self, scope: Mapping[str, Any]) -> str:
        """The client's address: the direct peer, or the first untrusted forwarded hop."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self or not self.trusts(peer):
            return str(peer)
        hops = _forwarded_hops(scope.get("headers", ()))
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        # Every hop is a trusted proxy: the leftmost is the closest we know to the client.
        return hops[0] if hops else str(peer)


def _forwarded_hops(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Addresses of ``Forwarded: for=`` (preferred, RFC 7239) or else ``X-Forwarded-For``."""
    forwarded: list[str] = []
    x_forwarded_for: list[str] = []
    for name, value in headers:
        if name == b"forwarded":
            for element in value.decode("latin-1").split(","):
                for pair in element.split(";"):
                    key, _, raw = pair.strip().partition("=")
                    if key.lower() == "for" and raw:
                        forwarded.append(_strip_host(raw))
        elif name == b"x-forwarded-for":
            x_forwarded_for.extend(
                hop.strip() for hop in value.decode("latin-1").split(",") if hop.strip()
            )
    return forwarded or x_forwarded_for


def _strip_host(raw: str) -> str:
    """``"[2001:db8::17]:4711"`` -> ``2001:db8::17``; ``192.0.2.60:80`` -> ``192.0.2.60``."""
    host = raw.strip().strip('"')
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


class _BuiltinKeyFunc:
    """A built-in key function; ``Limiter(trusted_proxies=...)`` makes a trusting copy."""

    def __init__(self, name: str, trusted: TrustedProxies | None = None) -> None:
        self.name = name
        self.trusted = trusted or TrustedProxies()
        self.__name__ = name

    def trusting(self, trusted: TrustedProxies) -> _BuiltinKeyFunc:
        return type(self)(self.name, trusted)

    def __repr__(self) -> str:
        return f"<quotagate key function {self.name}>"


class _RemoteAddress(_BuiltinKeyFunc):
    def __call__(self, request: HasScope) -> str:
        return self.trusted.client_host(request.scope)


class _ClientIp(_BuiltinKeyFunc):
    def __call__(self, request: HasScope) -> ClientKey:
        return ClientKey(ip_client_id(self.trusted.client_host(request.scope)))


class _ApiKeyOrIp(_BuiltinKeyFunc):
    def __call__(self, request: HasScope) -> ClientKey:
        api_key = bearer_or_header_key(request.scope)
        if api_key:
            client_id = _API_KEYS.get(api_key)
            if client_id is None:
                client_id = _remember(_API_KEYS, api_key, key_client_id(hash_api_key(api_key)))
                _remember(_SECRETS, client_id, api_key)
            return ClientKey(client_id)
        return ClientKey(ip_client_id(self.trusted.client_host(request.scope)))


#: API key -> its client id, for keys seen lately: a SHA-256 per request costs more than
#: the whole rate-limit decision. Bounded (emptied when full). ``_SECRETS`` maps those client
#: ids back to their API keys, for the masked form in DEBUG logs.
_API_KEYS: dict[str, str] = {}
_SECRETS: dict[str, str] = {}
_IDS: dict[str, str] = {}  # what storage_id made of keys that custom key functions returned
_REMEMBERED = 4096


def _remember(table: dict[str, Any], key: str, value: Any) -> Any:
    if len(table) >= _REMEMBERED:
        table.clear()
    table[key] = value
    return value


def bearer_or_header_key(scope: Mapping[str, Any]) -> str | None:
    """The API key of a request: ``X-API-Key``, else ``Authorization: Bearer <key>``."""
    bearer: str | None = None
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for name, value in headers:
        if name == b"x-api-key":
            key = value.decode("latin-1").strip()
            if key:
                return key
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
    return bearer


#: The direct peer's IP address, as slowapi's ``get_remote_address`` (a plain key function).
get_remote_address = _RemoteAddress("get_remote_address")

#: X-API-Key, then Authorization: Bearer, then the client IP (``key:<hash>``, ``ip:<addr>``).
api_key_or_ip = _ApiKeyOrIp("api_key_or_ip")


def client_ip(trusted_proxies: Iterable[str] = ()) -> Callable[[HasScope], ClientKey]:
    """A key function returning ``ip:<client address>``, believing ``X-Forwarded-For`` and
    ``Forwarded`` only from ``trusted_proxies`` (CIDRs).

    Raises:
        ConfigError: a CIDR does not parse.
    """
    return _ClientIp("client_ip", TrustedProxies(trusted_proxies))


def with_trusted_proxies(key_func: KeyFunc, trusted: TrustedProxies) -> KeyFunc:
    """Apply a limiter's trusted proxies to a built-in key function; others are left alone."""
    if isinstance(key_func, _BuiltinKeyFunc) and trusted and not key_func.trusted:
        return key_func.trusting(trusted)
    return key_func


async def settled_key(key: Any, request: HasScope, trusted: TrustedProxies) -> str:
    """What a key function gave that is not a plain string, as a key: an async one's result
    awaited; None (it could not tell who the client is) becomes the client's address, so
    unidentified clients are counted each on their own, not all as one; anything else, text."""
    if inspect.isawaitable(key):
        key = await key
    if key is None:
        return trusted.client_host(request.scope)
    return key if isinstance(key, str) else str(key)


def storage_id(key: str) -> str:
    """The client part of storage keys for whatever a key function returned.

    Built-in keys are already safe; an IP address becomes ``ip:<addr>``; anything else (say a
    custom key function returning the raw ``X-API-Key``, as in the seed tutorial) is hashed, so
    a raw secret never reaches Redis.
    """
    if isinstance(key, ClientKey):
        return str(key)
    found = _IDS.get(key)
    if found is None:
        client_id = ip_client_id(key) if _is_ip(key) else key_client_id(hash_api_key(key))
        found = _remember(_IDS, key, client_id)
    return found


def display_key(key: str) -> str:
    """How a resolved client key appears in logs: masked unless it is an address."""
    if isinstance(key, ClientKey):
        return key.masked
    return ip_client_id(key) if _is_ip(key) else mask_key(key)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True

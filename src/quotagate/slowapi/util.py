"""slowapi's key functions."""

from __future__ import annotations

from starlette.requests import Request

from ..identity import get_remote_address

__all__ = ["get_ipaddr", "get_remote_address"]


def get_ipaddr(request: Request) -> str:
    """slowapi's: the ``X_FORWARDED_FOR`` header as the client sent it, else the peer's
    address (``127.0.0.1`` when there is none).

    Any client can send that header and be whoever it says: behind a proxy, use
    ``quotagate.identity.client_ip(trusted_proxies=[...])``, which believes the forwarded
    address only from your proxies.
    """
    forwarded = request.headers.get("X_FORWARDED_FOR")
    if forwarded is not None:
        return forwarded
    return request.client.host if request.client and request.client.host else "127.0.0.1"

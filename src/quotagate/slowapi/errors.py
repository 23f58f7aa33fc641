"""slowapi's ``RateLimitExceeded``: a Starlette ``HTTPException`` (429, ``detail`` the limit
as text or the limit's ``error_message``, ``limit`` the limit), and also quotagate's own, so
``exc.decision`` and ``exc.retry_after`` are there too and ``except QuotagateError`` catches it.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException

from .. import fastapi
from ..decision import Decision
from .wrappers import Limit, limits_text

__all__ = ["RateLimitExceeded"]


class RateLimitExceeded(HTTPException, fastapi.RateLimitExceeded):
    """Raised by a limited endpoint over its limit; the app's handler for it answers.

    Without a handler, FastAPI's (or Starlette's) ``HTTPException`` handler answers 429 with
    ``detail``, as under slowapi.
    """

    def __init__(
        self,
        limit: Limit,
        decision: Decision | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.limit = limit
        message = limit.error_message
        if message is None:
            detail = limits_text(limit.limit)
        else:
            detail = message() if callable(message) else message
        rate = limit.limit
        fastapi.RateLimitExceeded.__init__(
            self,
            decision or Decision(False, "limited", rate.period, rate.amount, 0, rate.period, ()),
        )
        HTTPException.__init__(self, status_code=429, detail=detail, headers=dict(headers or {}))

"""slowapi's ``Limit`` and ``LimitGroup``: what one decorator (or default, or application
limit) asks for, and the one rate of it that a rejection names (``RateLimitExceeded.limit``).

A group holds ``quotagate.fastapi``'s own limit spec, its callables already brought to one
convention at decoration time, and the few things slowapi adds around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..fastapi import LimitSpec
from ..rates import Rate

__all__ = ["ErrorMessage", "Limit", "LimitGroup", "limits_text"]

#: An error message, or a callable of nothing giving one (slowapi calls it with nothing).
ErrorMessage = str | Callable[[], str]


@dataclass(frozen=True, slots=True)
class LimitGroup:
    """The limits of one ``@limiter.limit`` / ``shared_limit``, default or application limit."""

    spec: LimitSpec
    scope: str | None = None
    """A shared counter name (``shared_limit``, ``"global"`` for application limits); None:
    the route's own (its URL or its function, by ``key_style``)."""
    per_method: bool = False
    methods: frozenset[str] | None = None
    """The methods limited, upper case; None: every method."""
    error_message: ErrorMessage | None = None
    override_defaults: bool = True

    def scope_for(self, endpoint_key: str, method: str) -> str | None:
        """The counter name for a request, or None when its method is not limited."""
        if self.methods is not None and method not in self.methods:
            return None
        scope = self.scope or endpoint_key
        return f"{scope}:{method}" if self.per_method else scope


@dataclass(frozen=True, slots=True)
class Limit:
    """One rate of a group: the limit a rejection was for."""

    limit: Rate
    group: LimitGroup

    @property
    def error_message(self) -> ErrorMessage | None:
        return self.group.error_message

    @property
    def scope(self) -> str | None:
        return self.group.scope

    @property
    def per_method(self) -> bool:
        return self.group.per_method

    @property
    def methods(self) -> frozenset[str] | None:
        return self.group.methods

    @property
    def override_defaults(self) -> bool:
        return self.group.override_defaults


def limits_text(rate: Rate) -> str:
    """A rate as ``limits`` writes it, the text of slowapi's ``exc.detail``: ``5 per 1 minute``."""
    multiple, name = rate.unit
    return f"{rate.amount} per {multiple:g} {name}"

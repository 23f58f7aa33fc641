"""Limit discovery: the request limit a burst runs into, read from the config (a tier's
``requests``) or from a response's headers (``x-ratelimit-limit-requests``, else
``X-RateLimit-Limit``, the window from ``RateLimit-Policy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...rates import Rate, parse_rates
from .evidence import Exchange

if TYPE_CHECKING:
    from ...gateway.config import GatewayConfig

__all__ = ["LimitUnderTest", "configured_limit", "limit_from_headers", "remaining"]


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


def configured_limit(config: GatewayConfig | None, tier: str | None) -> LimitUnderTest | None:
    """The request limit of ``tier`` from the config, when the config knows it."""
    if config is None or tier is None or tier not in config.tiers:
        return None
    text = config.tiers[tier].requests
    if not text:
        return None
    rate = _tightest(parse_rates(text))
    return LimitUnderTest(rate.amount, rate.period, str(rate), "config", tier)


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


def limit_from_headers(exchange: Exchange, source: str) -> LimitUnderTest | None:
    """The request limit a response's headers state, or None when they state none."""
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


def remaining(exchange: Exchange) -> int | None:
    """The requests left after ``exchange``: the OpenAI requests header, else X-RateLimit's."""
    value = exchange.int_header("x-ratelimit-remaining-requests")
    return value if value is not None else exchange.int_header("x-ratelimit-remaining")

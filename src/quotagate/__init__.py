"""quotagate: rate limiting for AI (LLM inference) APIs.

import quotagate as qg

async with qg.RateLimiter("memory://") as limiter:
    decision = await limiter.hit("client-a", "60/minute; 1000/day")
    if not decision.allowed:
        ...  # 429, Retry-After: ceil(decision.retry_after)
"""

from __future__ import annotations

from ._types import Algorithm, Clock, Reason
from .decision import Decision, Lease, LimitState
from .errors import ConfigError, QuotagateError, StorageError
from .limiter import Acquire, Hit, RateLimiter
from .rates import Rate, parse_rate, parse_rates
from .storage import FallbackStorage, MemoryStorage, RedisStorage, Storage, storage_from_url
from .testing import FakeClock

__version__ = "0.1.0"

__all__ = [
    "Acquire",
    "Algorithm",
    "Clock",
    "ConfigError",
    "Decision",
    "FakeClock",
    "FallbackStorage",
    "Hit",
    "Lease",
    "LimitState",
    "MemoryStorage",
    "QuotagateError",
    "Rate",
    "RateLimiter",
    "Reason",
    "RedisStorage",
    "Storage",
    "StorageError",
    "__version__",
    "parse_rate",
    "parse_rates",
    "storage_from_url",
]

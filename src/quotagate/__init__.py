"""quotagate: rate limiting for AI (LLM inference) APIs.

import quotagate as qg

async with qg.RateLimiter("memory://") as limiter:
    decision = await limiter.hit("client-a", "60/minute; 1000/day")
    if not decision.allowed:
        ...  # 429, Retry-After: ceil(decision.retry_after)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._types import Algorithm, Clock, Reason
from .decision import Decision, Lease, LimitState
from .errors import ConfigError, QuotagateError, StorageError
from .limiter import Acquire, Hit, RateLimiter
from .rates import Rate, parse_rate, parse_rates
from .storage import FallbackStorage, MemoryStorage, Storage, storage_from_url
from .testing import FakeClock

if TYPE_CHECKING:
    from .storage.redis import RedisStorage

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


def __getattr__(name: str) -> object:
    # RedisStorage is imported on first use (PEP 562), so that memory-only users never import
    # redis-py and hiredis; ``from quotagate import RedisStorage`` goes through here too.
    if name == "RedisStorage":
        from .storage.redis import RedisStorage

        globals()[name] = RedisStorage
        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

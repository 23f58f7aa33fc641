"""The one exception tree of quotagate.

    QuotagateError
     ├── ConfigError        bad rate text, bad config value, bad argument
     ├── StorageError       the storage backend failed or timed out (raised from the driver's)
     │    └── RecordConflict a record changed between its read and its write
     ├── RateLimitExceeded  quotagate.fastapi: a request over its limit (the app's 429 handler)
     ├── UpstreamError      quotagate.gateway.backends: the model server is down, slow, broken
     └── UpstreamRejected   quotagate.gateway.backends: the model server refused (its 4xx)

The last three live with the layer that raises them (FastAPI's, the gateway's), below this
root, so ``except QuotagateError`` catches everything quotagate raises on purpose.

Decisions are values, not exceptions: a rejected request is a ``Decision`` with
``allowed == False``; these exceptions are for things that are broken.
"""

from __future__ import annotations

__all__ = ["ConfigError", "QuotagateError", "RecordConflict", "StorageError"]


class QuotagateError(Exception):
    """Root of every error quotagate raises on purpose."""


class ConfigError(QuotagateError, ValueError):
    """A rate, setting or argument is invalid; the message names the bad value."""


class StorageError(QuotagateError):
    """The storage backend could not answer (connection lost, timeout, script error)."""


class RecordConflict(StorageError):
    """A record was changed by someone else between its read and this write: read it again."""

"""slowapi's API on quotagate's engine: migrating is replacing ``slowapi`` with
``quotagate.slowapi`` in the imports.

    from quotagate.slowapi import Limiter, _rate_limit_exceeded_handler
    from quotagate.slowapi.errors import RateLimitExceeded
    from quotagate.slowapi.middleware import SlowAPIMiddleware
    from quotagate.slowapi.util import get_remote_address

The modules mirror slowapi's (``errors``, ``extension``, ``middleware``, ``util``,
``wrappers``); what behaves differently, and why, is in the README's "Migrating from slowapi".
New code is better served by ``quotagate.fastapi``, the native API.
"""

from .extension import Limiter, _rate_limit_exceeded_handler

__all__ = ["Limiter", "_rate_limit_exceeded_handler"]

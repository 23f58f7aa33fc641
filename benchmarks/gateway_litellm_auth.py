"""LiteLLM ``custom_auth`` for ``benchmarks/gateway.py``: per-key limits without a database.

LiteLLM's own per-key limits live on virtual keys, and virtual keys live in its Postgres
database. Without one, the documented ``general_settings.custom_auth`` hook is how a key gets
limits: it returns a ``UserAPIKeyAuth`` carrying ``rpm_limit``, ``tpm_limit`` and
``max_parallel_requests``, and LiteLLM's rate limiter (``parallel_request_limiter_v3``, the
default) enforces them per key in process memory, exactly as it would for a virtual key read
from the database. The limits mirror quotagate's benchmark tier (requests, tokens, concurrency)
and, like it, are high enough that nothing is rejected during a run.

Loaded by LiteLLM from ``gateway_litellm_config.yaml`` (same folder); runs inside LiteLLM's
venv, never in quotagate's. The key and the limits come from the environment that
``gateway.py`` gives the proxy:

    GATEWAY_BENCH_KEY       the only valid key (Authorization: Bearer ...)
    GATEWAY_BENCH_RPM       requests per minute for it
    GATEWAY_BENCH_TPM       tokens per minute
    GATEWAY_BENCH_PARALLEL  requests in flight at once
"""

from __future__ import annotations

import os
import secrets

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

_KEY = os.environ.get("GATEWAY_BENCH_KEY", "")
_LIMITS = {
    "rpm_limit": int(os.environ.get("GATEWAY_BENCH_RPM", "10000000")),
    "tpm_limit": int(os.environ.get("GATEWAY_BENCH_TPM", "1000000000")),
    "max_parallel_requests": int(os.environ.get("GATEWAY_BENCH_PARALLEL", "1000")),
}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """The bench key with its limits; any other key is refused with a 401."""
    if not _KEY or not secrets.compare_digest(api_key.encode(), _KEY.encode()):
        raise HTTPException(status_code=401, detail="invalid api key")
    return UserAPIKeyAuth(api_key=api_key, **_LIMITS)

"""The seed tutorial's inference API, rebuilt on quotagate.

Run it:   .venv/bin/uvicorn seed_tutorial:app --app-dir examples --port 8000
Redis:    QUOTAGATE_STORAGE_URL=redis://127.0.0.1:6379/0 \
              .venv/bin/uvicorn seed_tutorial:app --app-dir examples --port 8000
Try it:   curl -i -X POST localhost:8000/v1/completions -H 'X-API-Key: sk-demo-1' \
               -H 'content-type: application/json' -d '{"prompt": "Hello"}'

The tutorial's slowapi code maps one to one: ``Limiter(key_func=...)``, ``app.state.limiter``
(set by ``init_app``), ``@limiter.limit("60/minute")`` on the inference endpoint and
``@limiter.limit("600/minute")`` on the health endpoint, an API-key key function, Redis storage,
the JSON 429 body with Retry-After, and X-RateLimit-* headers on every response.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

from quotagate.fastapi import Limiter
from quotagate.identity import api_key_or_ip

# Knobs for deployments and for the tests; the tutorial's values are the defaults.
STORAGE_URL = os.environ.get("QUOTAGATE_STORAGE_URL", "memory://")
COMPLETIONS_LIMIT = os.environ.get("COMPLETIONS_LIMIT", "60/minute")
HEALTH_LIMIT = os.environ.get("HEALTH_LIMIT", "600/minute")
TRUSTED_PROXIES = [p for p in os.environ.get("QUOTAGATE_TRUSTED_PROXIES", "").split(",") if p]

# X-API-Key (or Authorization: Bearer), else the client IP; keys are hashed before storage.
limiter = Limiter(key_func=api_key_or_ip, storage_uri=STORAGE_URL, trusted_proxies=TRUSTED_PROXIES)
app = FastAPI(title="Inference API (seed tutorial, on quotagate)")
limiter.init_app(app)


class CompletionRequest(BaseModel):
    prompt: str
    max_tokens: int = 16


@app.post("/v1/completions")
@limiter.limit(COMPLETIONS_LIMIT)
async def completions(body: CompletionRequest) -> dict[str, object]:
    text = " ".join(["token"] * min(body.max_tokens, 16))
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


@app.get("/health")
@limiter.limit(HEALTH_LIMIT)
async def health() -> dict[str, str]:
    return {"status": "ok", "storage": limiter.storage.mode}

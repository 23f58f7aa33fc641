"""A stand-in gateway for ``quotagate verify``'s failure tests, served by real uvicorn.

The seed tutorial's app on ``quotagate.fastapi`` with the gateway's endpoints (10/minute on
``POST /v1/completions``, 600/minute on ``GET /health``) and two knobs an operator can get wrong:

- ``FAKE_KEY_FUNC=one_client``: a key function that counts everyone as one client (the
  tutorial's first "common failure");
- ``FAKE_HEADERS=off``: rate-limit headers turned off on successful responses.

With neither knob it is configured right, and verify must pass on it.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from pydantic import BaseModel

from quotagate.fastapi import Limiter
from quotagate.identity import api_key_or_ip


def everyone(request: Request) -> str:
    return "everyone"


ONE_CLIENT = os.environ.get("FAKE_KEY_FUNC") == "one_client"
HEADERS = os.environ.get("FAKE_HEADERS", "on") == "on"

limiter = Limiter(key_func=everyone if ONE_CLIENT else api_key_or_ip, headers_enabled=HEADERS)
app = FastAPI(title="fake gateway")
limiter.init_app(app)


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16


@app.post("/v1/completions")
@limiter.limit("10/minute")
async def completions(body: CompletionRequest) -> dict[str, object]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "model": body.model,
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@app.get("/health")
@limiter.limit("600/minute")
async def health() -> dict[str, str]:
    return {"status": "ok", "storage": limiter.storage.mode, "version": "fake"}

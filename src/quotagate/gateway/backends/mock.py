"""The built-in mock model ``quotagate-mock``: deterministic text, exact usage, real streaming.

Good enough to run the gateway with no model server and to load-test it: it honours
``max_tokens`` / ``max_completion_tokens`` and ``n``, reports ``usage`` counted the way the
gateway estimates (so reservations settle to exact numbers), streams when asked, and can
simulate generation speed (``tokens_per_second``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..schemas import validate_body
from ..tokens import output_cap, prompt_tokens
from . import MOCK_MODEL, Answer, Route

__all__ = [
    "NATURAL_LENGTH",
    "MockBackend",
    "create_mock_app",
    "mock_text",
]

#: Tokens the mock says when nothing caps it.
NATURAL_LENGTH = 24
# Each word is one token by the gateway's count (one word piece, at most four characters).
_WORDS = (
    " the",
    " cat",
    " sat",
    " on",
    " a",
    " mat",
    " and",
    " saw",
    " one",
    " red",
    " fox",
    " run",
    " far",
    " out",
    " of",
    " its",
    " den",
    " to",
    " get",
    " new",
)


def mock_text(tokens: int) -> list[str]:
    """The mock's words for an answer of ``tokens`` tokens."""
    return [_WORDS[i % len(_WORDS)] for i in range(tokens)]


class MockBackend:
    """Answers in process; ``tokens_per_second`` > 0 paces generation like a real model."""

    kind = "mock"
    url = None

    def __init__(
        self, tokens_per_second: float = 0.0, models: tuple[str, ...] = (MOCK_MODEL,)
    ) -> None:
        self.tokens_per_second = tokens_per_second
        self.model_names = models

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def models(self) -> list[dict[str, Any]]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "quotagate"}
            for name in self.model_names
        ]

    def _plan(self, route: Route, body: dict[str, Any]) -> tuple[int, int, str, int]:
        cap = output_cap(body)
        generated = NATURAL_LENGTH if cap is None else min(cap, NATURAL_LENGTH)
        finish = "length" if cap is not None and cap < NATURAL_LENGTH else "stop"
        n = body.get("n") or 1
        return prompt_tokens(route, body), generated, finish, n

    async def complete(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> Answer:
        answer = await self.answer(route, body)
        return Answer(json.dumps(answer, separators=(",", ":")).encode(), answer)

    async def answer(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        """The completion as a JSON object."""
        prompt, generated, finish, n = self._plan(route, body)
        if self.tokens_per_second > 0:
            await asyncio.sleep(generated / self.tokens_per_second)
        text = "".join(mock_text(generated))
        created = int(time.time())
        model = body.get("model") or MOCK_MODEL
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": generated * n,
            "total_tokens": prompt + generated * n,
        }
        if route == "chat":
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i in range(n)
                ],
                "usage": usage,
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": usage,
        }

    async def stream(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        prompt, generated, finish, n = self._plan(route, body)
        created = int(time.time())
        model = body.get("model") or MOCK_MODEL
        chat = route == "chat"
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}" if chat else f"cmpl-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        delay = 1 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {"id": ident, "object": kind, "created": created, "model": model}
            payload["choices"] = choices
            payload.update(extra)
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        def choice(
            i: int, text: str | None, finish_reason: str | None, role: bool = False
        ) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                return {
                    "index": i,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            return {
                "index": i,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        if chat:
            yield event([choice(i, None, None, role=True) for i in range(n)])
        for word in mock_text(generated):
            if delay:
                await asyncio.sleep(delay)
            yield event([choice(i, word, None) for i in range(n)])
        yield event([choice(i, None if chat else "", finish) for i in range(n)])
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": generated * n,
                "total_tokens": prompt + generated * n,
            }
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"


def create_mock_app(
    tokens_per_second: float = 0.0,
    *,
    models: tuple[str, ...] = (MOCK_MODEL,),
    latency_s: float = 0.0,
) -> FastAPI:
    """The mock model served standalone: a small OpenAI-compatible server (no limits).

    Stands in for vLLM or llama.cpp in tests and benchmarks: ``quotagate mock --port 9000``;
    several of them, each with ``--model`` names and a ``--latency-ms``, are a fleet of
    replicas. ``GET /stats`` counts the completions each one received.
    """
    backend = MockBackend(tokens_per_second, models)
    app = FastAPI(title="quotagate mock model")
    received = {"completions": 0}

    async def answer(request: Request, route: Route) -> Response:
        received["completions"] += 1
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "invalid JSON"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "expected an object"}}, status_code=400)
        if problem := validate_body(route, body):
            return JSONResponse({"error": {"message": ": ".join(problem)}}, status_code=400)
        if body.get("stream"):
            return StreamingResponse(backend.stream(route, body), media_type="text/event-stream")
        return JSONResponse(await backend.answer(route, body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, "completions")

    @app.get("/v1/models")
    async def listed() -> dict[str, Any]:
        return {"object": "list", "data": await backend.models()}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return dict(received)

    return app

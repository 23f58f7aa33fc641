"""The built-in mock model ``quotagate-mock``: deterministic text, exact usage, real streaming.

Good enough to run the gateway with no model server and to load-test it: it honours
``max_tokens`` / ``max_completion_tokens`` and ``n``, reports ``usage`` counted the way the
gateway estimates (so reservations settle to exact numbers), streams when asked, and can
simulate generation speed (``tokens_per_second``). Served standalone with a ``GpuOptions``,
it is paced by a simulated GPU instead (``gpu.py``: batching, a KV cache, vLLM's metrics).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...metrics import CONTENT_TYPE_LATEST
from ..schemas import validate_body
from ..tokens import output_cap, prompt_tokens
from . import MOCK_MODEL, Answer, Route
from .gpu import FinishReason, Generation, GpuOptions, GpuServer, Refusal, render_metrics

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


class _Plan(NamedTuple):
    """What the mock will answer to a request."""

    prompt: int
    generated: int
    """Per choice: the natural length, or the request's cap when that is shorter."""
    finish: FinishReason
    n: int


def _plan(route: Route, body: dict[str, Any], natural_length: int) -> _Plan:
    cap = output_cap(body)
    generated = natural_length if cap is None else min(cap, natural_length)
    finish: FinishReason = "length" if cap is not None and cap < natural_length else "stop"
    return _Plan(prompt_tokens(route, body), generated, finish, body.get("n") or 1)


class _Reply:
    """One completion's bodies: the answer as a whole, or its stream's events."""

    def __init__(self, route: Route, body: dict[str, Any], plan: _Plan) -> None:
        self.plan = plan
        self.chat = route == "chat"
        self.model = body.get("model") or MOCK_MODEL
        self.created = int(time.time())
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.ident = f"{prefix}-{uuid.uuid4().hex[:24]}"
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def usage(self) -> dict[str, int]:
        prompt, generated, _, n = self.plan
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated * n,
            "total_tokens": prompt + generated * n,
        }

    def answer(self) -> dict[str, Any]:
        """The completion as a JSON object."""
        _, generated, finish, n = self.plan
        text = "".join(mock_text(generated))
        if self.chat:
            return {
                "id": self.ident,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i in range(n)
                ],
                "usage": self.usage(),
            }
        return {
            "id": self.ident,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": self.usage(),
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {"id": self.ident, "object": kind, "created": self.created, "model": self.model}
        payload["choices"] = choices
        payload.update(extra)
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def _choice(
        self, i: int, text: str | None, finish_reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def opening(self, choices: Iterable[int]) -> list[bytes]:
        """The events before the first token (chat: the assistant's role)."""
        if not self.chat:
            return []
        return [self._event([self._choice(i, None, None, role=True) for i in choices])]

    def token(self, choices: Iterable[int], position: int) -> bytes:
        """The ``position``-th token (1-based) of each choice in ``choices``."""
        word = _WORDS[(position - 1) % len(_WORDS)]
        return self._event([self._choice(i, word, None) for i in choices])

    def finish(self, choices: Iterable[int]) -> bytes:
        finish = self.plan.finish
        return self._event([self._choice(i, None if self.chat else "", finish) for i in choices])

    def closing(self) -> list[bytes]:
        """The events after the last choice's finish: the usage if asked, then ``[DONE]``."""
        usage = [self._event([], usage=self.usage())] if self.include_usage else []
        return [*usage, b"data: [DONE]\n\n"]


class MockBackend:
    """Answers in process; ``tokens_per_second`` > 0 paces generation like a real model.

    ``output_tokens``: the length of an answer that ``max_tokens`` does not cut first.
    """

    kind = "mock"
    url = None

    def __init__(
        self,
        tokens_per_second: float = 0.0,
        models: tuple[str, ...] = (MOCK_MODEL,),
        output_tokens: int = NATURAL_LENGTH,
    ) -> None:
        self.tokens_per_second = tokens_per_second
        self.model_names = models
        self.output_tokens = output_tokens

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def models(self) -> list[dict[str, Any]]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "quotagate"}
            for name in self.model_names
        ]

    def plan(self, route: Route, body: dict[str, Any]) -> _Plan:
        return _plan(route, body, self.output_tokens)

    async def complete(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> Answer:
        answer = await self.answer(route, body)
        return Answer(json.dumps(answer, separators=(",", ":")).encode(), answer)

    async def answer(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        """The completion as a JSON object."""
        plan = self.plan(route, body)
        if self.tokens_per_second > 0:
            await asyncio.sleep(plan.generated / self.tokens_per_second)
        return _Reply(route, body, plan).answer()

    async def stream(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        plan = self.plan(route, body)
        reply = _Reply(route, body, plan)
        delay = 1 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        choices = range(plan.n)
        for event in reply.opening(choices):
            yield event
        for position in range(1, plan.generated + 1):
            if delay:
                await asyncio.sleep(delay)
            yield reply.token(choices, position)
        yield reply.finish(choices)
        for event in reply.closing():
            yield event


async def _gpu_stream(reply: _Reply, generation: Generation) -> AsyncGenerator[bytes, None]:
    """A stream paced by the simulated GPU: each choice's token as its step ends.

    The role event goes with the first token, as vLLM sends it; a client gone (the response
    cancelled or closed) aborts what is left, freeing its KV.
    """
    try:
        opened = False
        async for choice, position in generation:
            if not opened:
                opened = True
                for event in reply.opening(range(reply.plan.n)):
                    yield event
            yield reply.token((choice,), position)
            if position == reply.plan.generated:
                yield reply.finish((choice,))
        for event in reply.closing():
            yield event
    finally:
        generation.abort()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished(generation: Generation, request: Request) -> bool:
    """Wait for every token of a non-streamed answer; False when the client went first (its
    sequences are aborted then, as vLLM aborts a request whose client disconnected)."""
    done = asyncio.ensure_future(generation.wait())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
        return done.done()
    finally:
        done.cancel()
        gone.cancel()
        generation.abort()
        if done.done() and not done.cancelled():
            done.result()  # GpuStopped: the server is shutting down


def create_mock_app(
    tokens_per_second: float = 0.0,
    *,
    models: tuple[str, ...] = (MOCK_MODEL,),
    latency_s: float = 0.0,
    output_tokens: int = NATURAL_LENGTH,
    gpu: GpuOptions | None = None,
) -> FastAPI:
    """The mock model served standalone: a small OpenAI-compatible server (no limits).

    Stands in for vLLM or llama.cpp in tests and benchmarks: ``quotagate mock --port 9000``;
    several of them, each with ``--model`` names and a ``--latency-ms``, are a fleet of
    replicas. ``GET /stats`` counts the completions each one received.

    Args:
        tokens_per_second: without ``gpu``, each answer's pace (0: at once).
        models: the names it lists and serves (the first labels ``/metrics``).
        latency_s: waited before each answer.
        output_tokens: an answer's length when its ``max_tokens`` is not shorter.
        gpu: a simulated GPU paces every answer (``tokens_per_second`` is ignored); the app
            also serves vLLM's ``GET /metrics``. Its engine is ``app.state.gpu``.
    """
    backend = MockBackend(tokens_per_second, models, output_tokens)
    server = GpuServer(gpu) if gpu is not None else None
    app = FastAPI(title="quotagate mock model", lifespan=_lifespan(server) if server else None)
    app.state.gpu = server
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
        if server is not None:
            return await gpu_answer(request, route, body, server)
        if body.get("stream"):
            return StreamingResponse(backend.stream(route, body), media_type="text/event-stream")
        return JSONResponse(await backend.answer(route, body))

    async def gpu_answer(
        request: Request, route: Route, body: dict[str, Any], server: GpuServer
    ) -> Response:
        plan = backend.plan(route, body)
        generation = server.submit(plan.prompt, plan.generated, plan.n, plan.finish)
        if isinstance(generation, Refusal):
            return JSONResponse(generation.body(), status_code=generation.status)
        reply = _Reply(route, body, plan)
        if body.get("stream"):
            return StreamingResponse(_gpu_stream(reply, generation), media_type="text/event-stream")
        if not await _finished(generation, request):
            return Response(status_code=499)  # nobody reads it: the client is gone
        return JSONResponse(reply.answer())

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

    if server is not None:

        @app.get("/metrics")
        async def metrics() -> Response:
            text = render_metrics(server.model, models[0])
            return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


def _lifespan(server: GpuServer) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with server:
            yield

    return lifespan

"""Any OpenAI-compatible model server (vLLM, llama.cpp, Ollama, OpenAI itself) as the backend.

One pooled ``httpx.AsyncClient``; streams are passed through chunk by chunk, never buffered
whole. Failures become ``UpstreamError`` (502 down or broken, 504 timed out); a 4xx from the
model server is the client's problem and is passed on as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from . import Route, UpstreamError, UpstreamRejected

__all__ = ["OpenAIBackend"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


class OpenAIBackend:
    """Forward to ``url`` (the server's ``/v1`` base), with ``api_key`` as a Bearer token."""

    kind = "openai"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_env(cls, url: str, api_key_env: str | None, **kwargs: Any) -> OpenAIBackend:
        return cls(url, api_key=os.environ.get(api_key_env) if api_key_env else None, **kwargs)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.url,
                timeout=self.timeout,
                limits=self.limits,
                headers=headers,
                transport=self._transport,
            )
        return self._client

    async def start(self) -> None:
        _ = self.client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def models(self) -> list[dict[str, Any]]:
        try:
            response = await self.client.get("/models")
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self.url) from exc
        if response.status_code != 200:
            raise UpstreamError(
                502, "upstream_error", f"upstream /models answered {response.status_code}"
            )
        data = response.json().get("data", [])
        return data if isinstance(data, list) else []

    async def complete(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(_PATHS[route], json=body)
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self.url) from exc
        _raise_for_status(response.status_code, response.content, response.headers)
        try:
            answer = response.json()
        except ValueError:
            raise UpstreamError(502, "upstream_error", "upstream answered invalid JSON") from None
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, "upstream_error", "upstream answered JSON that is not an object"
            )
        return answer

    async def stream(self, route: Route, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        try:
            async with self.client.stream("POST", _PATHS[route], json=body) as response:
                if response.status_code != 200:
                    _raise_for_status(
                        response.status_code, await response.aread(), response.headers
                    )
                async for chunk in response.aiter_raw():
                    yield chunk
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self.url) from exc


def _raise_for_status(status: int, content: bytes, headers: httpx.Headers) -> None:
    if status < 300:
        return
    if 400 <= status < 500:
        raise UpstreamRejected(status, content, headers.get("content-type", "application/json"))
    detail = content[:200].decode("utf-8", "replace")
    try:
        parsed = json.loads(content)
        detail = (
            json.dumps(parsed.get("error", parsed))[:200] if isinstance(parsed, dict) else detail
        )
    except ValueError:
        pass
    raise UpstreamError(502, "upstream_error", f"the model server answered {status}: {detail}")


def _upstream_error(exc: httpx.HTTPError, url: str) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, "upstream_timeout", f"the model server at {url} timed out")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(
            502, "upstream_unavailable", f"cannot connect to the model server at {url}"
        )
    return UpstreamError(502, "upstream_error", f"the model server at {url} failed: {exc!r}")

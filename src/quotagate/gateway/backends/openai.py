"""Any OpenAI-compatible model server (vLLM, llama.cpp, Ollama, OpenAI itself) as the backend.

Requests go over a pool of keep-alive connections (``http1.Http1Pool``); streams are passed
through piece by piece, never buffered whole; the model server's JSON answer is passed on as
it is. Failures become ``UpstreamError`` (502 down or broken, 504 timed out); a 4xx from the
model server is the client's problem and is passed on as it is.

``transport=`` routes the requests through ``httpx`` with that transport instead (in-process
test upstreams, or a transport of your own).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import httpx

from . import Answer, Route, UpstreamError, UpstreamFull, UpstreamRejected
from .http1 import Http1Pool

__all__ = ["OpenAIBackend"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


class _Response(Protocol):
    status: int

    def header(self, name: bytes, default: str = "") -> str: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


class _Client(Protocol):
    async def request(self, method: str, path: str, body: bytes | None = None) -> _Response: ...

    async def aclose(self) -> None: ...


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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: _Client
        if transport is None:
            self._client = Http1Pool(
                self.url,
                headers=headers,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_connections=max_connections,
            )
        else:
            self._client = _HttpxClient(self.url, headers, timeout, connect_timeout, transport)

    @classmethod
    def from_env(cls, url: str, api_key_env: str | None, **kwargs: Any) -> OpenAIBackend:
        return cls(url, api_key=os.environ.get(api_key_env) if api_key_env else None, **kwargs)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def models(self) -> list[dict[str, Any]]:
        response = await self._client.request("GET", "/models")
        content = await response.read()
        if response.status != 200:
            raise UpstreamError(
                502, "upstream_error", f"upstream /models answered {response.status}"
            )
        try:
            data = json.loads(content).get("data", [])
        except (ValueError, AttributeError):
            raise UpstreamError(502, "upstream_error", "upstream /models: invalid JSON") from None
        return data if isinstance(data, list) else []

    async def complete(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> Answer:
        response = await self._client.request("POST", _PATHS[route], raw or _dumps(body))
        content = await response.read()
        _raise_for_status(response, content)
        try:
            answer = json.loads(content)
        except ValueError:
            raise UpstreamError(502, "upstream_error", "upstream answered invalid JSON") from None
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, "upstream_error", "upstream answered JSON that is not an object"
            )
        return Answer(content, answer)

    async def stream(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        response = await self._client.request("POST", _PATHS[route], raw or _dumps(body))
        try:
            if response.status != 200:
                _raise_for_status(response, await response.read())
            async for chunk in response.chunks():
                yield chunk
        finally:
            response.close()


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _raise_for_status(response: _Response, content: bytes) -> None:
    status = response.status
    if status < 300:
        return
    if status in (429, 503):
        raise UpstreamFull(status, content[:200].decode("utf-8", "replace"))
    if 400 <= status < 500:
        raise UpstreamRejected(
            status, content, response.header(b"content-type", "application/json")
        )
    detail = content[:200].decode("utf-8", "replace")
    try:
        parsed = json.loads(content)
        detail = (
            json.dumps(parsed.get("error", parsed))[:200] if isinstance(parsed, dict) else detail
        )
    except ValueError:
        pass
    raise UpstreamError(502, "upstream_error", f"the model server answered {status}: {detail}")


class _HttpxResponse:
    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status_code

    def header(self, name: bytes, default: str = "") -> str:
        return str(self._response.headers.get(name.decode(), default))

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self._url) from exc
        finally:
            await self._response.aclose()

    def close(self) -> None:
        return None  # ``chunks`` closes the response; an unread one goes with the client


class _HttpxClient:
    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        timeout: float,
        connect_timeout: float,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        self.url = url
        self._client = httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )

    async def request(self, method: str, path: str, body: bytes | None = None) -> _Response:
        headers = {"content-type": "application/json"} if body is not None else None
        request = self._client.build_request(method, path, content=body, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self.url) from exc
        return _HttpxResponse(response, self.url)

    async def aclose(self) -> None:
        await self._client.aclose()


def _upstream_error(exc: httpx.HTTPError, url: str) -> UpstreamError:
    if isinstance(exc, httpx.ConnectTimeout):
        message = f"connecting to the model server at {url} timed out"
        return UpstreamError(504, "upstream_timeout", message, unsent=True)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, "upstream_timeout", f"the model server at {url} timed out")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(
            502, "upstream_unavailable", f"cannot connect to the model server at {url}", unsent=True
        )
    return UpstreamError(502, "upstream_error", f"the model server at {url} failed: {exc!r}")

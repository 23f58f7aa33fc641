"""Model backends the gateway forwards to: the built-in mock, or any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from ...errors import QuotagateError

if TYPE_CHECKING:
    from ..config import FleetBackendConfig

__all__ = [
    "MOCK_MODEL",
    "Answer",
    "Backend",
    "Route",
    "UpstreamError",
    "UpstreamFull",
    "UpstreamRejected",
    "backend_from_config",
]

Route = Literal["chat", "completions"]

#: The built-in mock model's name (``backends/mock.py``): the default everywhere a model is
#: needed and none is configured.
MOCK_MODEL = "quotagate-mock"


class UpstreamError(QuotagateError):
    """The model server failed: down (502), timed out (504) or answered 5xx / garbage (502).

    ``unsent``: the server cannot have started the request (the connection was refused, timed
    out connecting, or was found closed before the request was written on it), so another
    replica may take it without generating twice.
    """

    def __init__(self, status: int, error: str, message: str, *, unsent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.unsent = unsent

    @property
    def outcome(self) -> str:
        """``unavailable`` (not reached), ``timeout`` or ``error`` (5xx, garbage, cut off)."""
        if self.unsent:
            return "unavailable"
        return "timeout" if self.error == "upstream_timeout" else "error"

    @property
    def replica_fault(self) -> bool:
        """Whether this counts against the replica's health: a slow answer does not."""
        return self.outcome != "timeout"


class UpstreamFull(UpstreamError):
    """The model server said it is full (429 or 503: vLLM's ``--max-num-queued-reqs``): it
    did not start the request, which may go to another replica or wait for a slot again."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(
            503, "backend_overloaded", f"the model server answered {status}: {detail}", unsent=True
        )
        self.upstream_status = status

    @property
    def outcome(self) -> str:
        return "full"

    @property
    def replica_fault(self) -> bool:
        return False  # alive and saying so


class UpstreamRejected(QuotagateError):
    """The model server refused the request (4xx): passed to the client as it is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class Answer(NamedTuple):
    """A non-streamed completion: the bytes the client gets as they are, and their parse (for
    ``usage``). Passing the model server's bytes on saves re-serialising every answer."""

    raw: bytes
    parsed: dict[str, Any]


class Backend(Protocol):
    @property
    def kind(self) -> str:
        """``mock`` or ``openai``."""
        ...

    @property
    def url(self) -> str | None:
        """Where requests go (None for the in-process mock)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def models(self) -> list[dict[str, Any]]: ...

    async def complete(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> Answer:
        """One non-streamed completion. ``raw``: the client's own JSON bytes, when the gateway
        changed nothing in ``body`` (sent on as they are)."""
        ...

    def stream(
        self, route: Route, body: dict[str, Any], raw: bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        """A streamed completion as Server-Sent Events bytes, exactly as OpenAI frames them."""
        ...


def backend_from_config(config: FleetBackendConfig, url: str | None) -> Backend:
    """The client for one replica (``url``) of a backend entry; the mock has no URL."""
    from .mock import MockBackend
    from .openai import OpenAIBackend

    if config.kind == "mock":
        return MockBackend(config.mock_tokens_per_second)
    return OpenAIBackend.from_env(
        url or "",
        config.api_key_env,
        timeout=config.timeout_s,
        connect_timeout=config.connect_timeout_s,
        # The gate holds a replica to max_concurrency; the pool leaves room for a reload's rise.
        max_connections=max(256, config.max_concurrency * 2),
    )

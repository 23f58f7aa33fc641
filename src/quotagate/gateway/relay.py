"""What an answer used: usage read from the model server's answer, or counted from its text.

Non-streamed answers carry ``usage``; streams carry it in a last chunk when asked
(``stream_options.include_usage``), so the gateway asks for it and drops that chunk again when
the client did not. Text is counted as a fallback, for servers that send no usage, and for a
stream cut short before its usage chunk.
"""

from __future__ import annotations

import json
from typing import Any

from .tokens import count_tokens

__all__ = ["SseRelay", "answer_tokens", "usage_total"]


class SseRelay:
    """Re-frames a Server-Sent Events stream: counts generated text, picks up the usage chunk,
    and drops that chunk when only the gateway asked for it."""

    def __init__(self, prompt: int, client_wants_usage: bool) -> None:
        self.prompt = prompt
        self.client_wants_usage = client_wants_usage
        self.generated = 0
        self.usage_total: int | None = None
        self._buffer = b""

    def charged(self) -> int:
        """Tokens to charge: the server's usage, else the prompt estimate plus what was seen."""
        return self.usage_total if self.usage_total is not None else self.prompt + self.generated

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete events in ``chunk`` (and what was buffered), to send on."""
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [out for event in events if (out := self._event(event)) is not None]

    def flush(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest, self._buffer = self._buffer, b""
        out = self._event(rest) if rest.strip() else None
        return [out] if out is not None else []

    def _event(self, event: bytes) -> bytes | None:
        data = b"".join(
            line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if data and data != b"[DONE]":
            try:
                payload = json.loads(data)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                total = usage_total(payload.get("usage"))
                if total is not None:
                    self.usage_total = total
                choices = payload.get("choices")
                if isinstance(choices, list):
                    for choice in choices:
                        self.generated += _choice_tokens(choice, "delta")
                    if not choices and total is not None and not self.client_wants_usage:
                        return None
        return event + b"\n\n"


def usage_total(usage: Any) -> int | None:
    """``usage.total_tokens`` when it is a count, else None."""
    if isinstance(usage, dict):
        total = usage.get("total_tokens")
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            return total
    return None


def answer_tokens(answer: dict[str, Any]) -> int:
    """Tokens in the text of a non-streamed answer's choices."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return 0
    return sum(_choice_tokens(choice, "message") for choice in choices)


def _choice_tokens(choice: Any, field: str) -> int:
    if not isinstance(choice, dict):
        return 0
    text = choice.get("text")
    if isinstance(text, str):
        return count_tokens(text)
    message = choice.get(field) or choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return count_tokens(message["content"])
    return 0

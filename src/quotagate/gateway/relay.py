"""What an answer used: usage read from the model server's answer, or counted from its text.

Non-streamed answers carry ``usage``; streams carry it in a last chunk when asked
(``stream_options.include_usage``), so the gateway asks for it and drops that chunk again when
the client did not. Text is counted as a fallback, for servers that send no usage, and for a
stream cut short before its usage chunk.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from .tokens import count_tokens

__all__ = ["SseRelay", "Used", "answer_tokens", "usage_total", "used_of"]


#: Uncounted event data held before it is counted anyway: bounds a long stream's memory.
_COUNT_AT = 64 * 1024


class Used(NamedTuple):
    """The tokens a served request is settled on: the server's usage, else the estimate."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def used_of(usage: Any, prompt: int, generated: int) -> Used:
    """The answer's ``usage`` split as it says (``total_tokens`` alone: the prompt estimate,
    the rest generated), else ``prompt`` estimated and ``generated`` counted."""
    total = usage_total(usage)
    if total is None:
        return Used(prompt, generated)
    asked, answered = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    if _count(asked) and _count(answered) and asked + answered == total:
        return Used(asked, answered)
    prompt = min(prompt, total)
    return Used(prompt, total - prompt)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SseRelay:
    """Re-frames a Server-Sent Events stream: picks up the usage chunk, drops that chunk when
    only the gateway asked for it, and counts generated text when no usage came.

    Why lazily: the gateway always asks for usage, so the text count is almost never needed;
    parsing every event's JSON to count it anyway was most of the relay's CPU. An event is
    parsed when it carries a ``usage`` that is not null; the others are kept as they came and
    counted only if the stream ends without usage (or past ``_COUNT_AT`` bytes of them).
    """

    def __init__(
        self, prompt: int, client_wants_usage: bool, limit: int | None = None, cap: int = 0
    ) -> None:
        self.prompt = prompt
        self.client_wants_usage = client_wants_usage
        #: Tokens the answer may carry as reserved so far; at that many (below its ``cap``, where
        #: the model server stops by itself) the relay is ``held``: the events after wait until
        #: the gateway reserves more (``grow``) or ends the stream (``end``: ``cut``). None: no
        #: hold (every event counted lazily).
        self.limit = limit
        self.cap = cap
        self.held = False
        self.cut = False
        self.generated = 0
        self.usage: Any = None  # the usage of the stream's usage chunk, when it came
        self._buffer = b""
        self._pending: deque[bytes] = deque()  # events not yet looked at (held)
        self._last: dict[str, Any] = {}  # the event the hold came at
        self._uncounted: list[bytes] = []
        self._uncounted_bytes = 0
        self._renamed: Callable[[bytes], bytes] | None = None

    def rename(self, upstream: str, client: str) -> None:
        """Put the client's model name (an alias) back where events name the upstream's."""
        field = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(upstream).encode()))
        replacement = rb"\1" + json.dumps(client).encode().replace(b"\\", b"\\\\")
        self._renamed = lambda event: field.sub(replacement, event)

    def used(self) -> Used:
        """Tokens to settle on: the server's usage, else the prompt estimate plus what was
        seen."""
        if self.usage is None:
            self._count_uncounted()
        return used_of(self.usage, self.prompt, self.generated)

    def charged(self) -> int:
        """Tokens to charge: ``used()`` in all."""
        return self.used().total

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete events in ``chunk`` (and what was buffered), to send on."""
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        if self.limit is not None:
            self._pending.extend(events)
            return self._drain()
        out = [sent for event in events if (sent := self._event(event)) is not None]
        return out if self._renamed is None else [self._renamed(event) for event in out]

    def flush(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self._pending.append(rest)
        return self._drain()

    def grow(self, tokens: int) -> list[bytes]:
        """``tokens`` more were reserved for the answer: the held events go on."""
        assert self.limit is not None
        self.limit += tokens
        self.held = False
        return self._drain()

    def end(self) -> list[bytes]:
        """No more could be reserved: the stream ends where it was held, as a model server
        ends an answer at its ``max_tokens``."""
        self.held = False
        self.cut = True
        self._pending.clear()
        ending = self._ending(self._last)
        return [ending if self._renamed is None else self._renamed(ending)]

    def _drain(self) -> list[bytes]:
        """The pending events to send on, up to a hold."""
        out: list[bytes] = []
        while self._pending and not self.held:
            sent = self._event(self._pending.popleft())
            if sent is not None:
                out.append(sent if self._renamed is None else self._renamed(sent))
        return out

    def _event(self, event: bytes) -> bytes | None:
        if event.startswith(b"data:") and b"\n" not in event:  # the common one-line event
            data = event[5:].lstrip()
        else:
            data = b"".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
        if not data or data == b"[DONE]":
            return event + b"\n\n"
        if self.limit is not None:
            return self._limited(event, data)
        if not _has_usage(data):
            self._uncounted.append(data)
            self._uncounted_bytes += len(data)
            if self._uncounted_bytes > _COUNT_AT:
                self._count_uncounted()
            return event + b"\n\n"
        payload = _parsed(data)
        if payload is not None and not self._count(payload):
            return None
        return event + b"\n\n"

    def _count(self, payload: dict[str, Any]) -> bool:
        """Take an event's usage and generated text into account; whether it is sent on (the
        usage chunk only the gateway asked for is not)."""
        total = usage_total(payload.get("usage"))
        if total is not None:
            self.usage = payload["usage"]
        choices = payload.get("choices")
        if isinstance(choices, list):
            self.generated += _choices_tokens(choices, "delta")
            if not choices and total is not None and not self.client_wants_usage:
                return False
        return True

    def _limited(self, event: bytes, data: bytes) -> bytes | None:
        """An event of a stream with a ``limit``: counted now; the one that reaches the limit
        holds the stream after it."""
        payload = _parsed(data)
        if payload is None:
            return event + b"\n\n"
        if not self._count(payload):
            return None
        assert self.limit is not None
        if self.generated >= self.limit and self.limit < self.cap and self.usage is None:
            self.held = True
            self._last = payload
        return event + b"\n\n"

    def _ending(self, last: dict[str, Any]) -> bytes:
        """What a model server sends when an answer reaches its ``max_tokens``: a last chunk
        with ``finish_reason: "length"``, the usage chunk when the client asked for one, then
        ``[DONE]``."""
        head: dict[str, Any] = {
            k: last[k] for k in ("id", "object", "created", "model") if k in last
        }
        chat = head.get("object") == "chat.completion.chunk"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        events: list[dict[str, Any]] = [{**head, "choices": [choice]}]
        if self.client_wants_usage:
            used = self.used()
            usage = {
                "prompt_tokens": used.prompt,
                "completion_tokens": used.completion,
                "total_tokens": used.total,
            }
            events.append({**head, "choices": [], "usage": usage})
        out = b"".join(
            b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events
        )
        return out + b"data: [DONE]\n\n"

    def _count_uncounted(self) -> None:
        for data in self._uncounted:
            payload = _parsed(data)
            if payload is not None:
                choices = payload.get("choices")
                if isinstance(choices, list):
                    self.generated += _choices_tokens(choices, "delta")
        self._uncounted.clear()
        self._uncounted_bytes = 0


def _has_usage(data: bytes) -> bool:
    """Whether an event's JSON has a ``"usage"`` key whose value is not null (a cheap look:
    a false yes only costs a parse; a quote inside a string is escaped, so no false no)."""
    at = data.find(b'"usage"')
    if at == -1:
        return False
    rest = data[at + 7 : at + 16].lstrip(b" \t\r\n:")
    return not rest.startswith(b"null")


def _parsed(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


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
    return _choices_tokens(choices, "message") if isinstance(choices, list) else 0


def _choices_tokens(choices: list[Any], field: str) -> int:
    return sum(_choice_tokens(choice, field) for choice in choices)


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

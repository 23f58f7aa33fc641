"""Token estimates for reservations, and the counting used when a stream brings no usage.

The estimate only has to be an honest upper bound for the reservation: after the response the
gateway settles on the real ``usage`` the model server reports. The mock model counts with the
same function, so its usage equals the estimate exactly (what the tests rely on).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

__all__ = ["Cost", "count_tokens", "output_cap", "prompt_tokens", "request_cost"]

_PIECE = re.compile(r"\w+|[^\w\s]")

#: Chat formats wrap each message in a few special tokens; OpenAI documents about 3 per message
#: and 3 to prime the reply.
MESSAGE_OVERHEAD = 3
REPLY_OVERHEAD = 3


def count_tokens(text: str) -> int:
    """Words and punctuation, or a quarter of the characters, whichever is more."""
    if not text:
        return 0
    return max(len(_PIECE.findall(text)), math.ceil(len(text) / 4))


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                total += count_tokens(text) if isinstance(text, str) else 85  # an image tile
        return total
    return 0


def prompt_tokens(route: str, body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat or completions request body (already validated)."""
    if route == "chat":
        total = REPLY_OVERHEAD
        for message in body["messages"]:
            total += MESSAGE_OVERHEAD + _content_tokens(message.get("content"))
            name = message.get("name")
            if isinstance(name, str):
                total += count_tokens(name)
        return total
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if not isinstance(prompt[0], str | list):
        return len(prompt)  # already token ids (validated: all of them)
    return sum(count_tokens(p) if isinstance(p, str) else len(p) for p in prompt)


def output_cap(body: dict[str, Any]) -> int | None:
    """The request's own cap on generated tokens, if it set one."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class Cost(NamedTuple):
    prompt: int
    """The prompt's estimate: charged as is when the answer reports no usage."""
    reserved: int
    """What the request may use at most: (prompt + output cap) x n."""
    capped: bool
    """The body got the default output cap (``max_tokens``) and must be serialised again."""


def request_cost(route: str, body: dict[str, Any], default_max_tokens: int) -> Cost:
    """A request's token bound. A body without an output cap gets ``default_max_tokens``
    (written into the body, so the upstream honours it and the reservation is a true bound)."""
    cap = output_cap(body)
    capped = cap is None
    if cap is None:
        body["max_tokens"] = cap = default_max_tokens
    prompt = prompt_tokens(route, body)
    return Cost(prompt, (prompt + cap) * (body.get("n") or 1), capped)

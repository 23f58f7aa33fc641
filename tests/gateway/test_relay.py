"""The stream relay: usage taken from the server's usage chunk, text counted only when none
came, the gateway's own usage chunk dropped, and a long stream's held text bounded."""

from __future__ import annotations

import json
from typing import Any

from quotagate.gateway import relay as relay_module
from quotagate.gateway.relay import SseRelay
from quotagate.gateway.tokens import count_tokens


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _delta(text: str, **extra: Any) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": text}}], **extra})


USAGE = _event({"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 42}})


def test_the_usage_chunk_is_what_is_charged_and_it_is_dropped_when_only_the_gateway_asked() -> None:
    relay = SseRelay(prompt=3, client_wants_usage=False)
    out = relay.feed(_delta("hello there") + _delta(" world") + USAGE + b"data: [DONE]\n\n")
    assert relay.charged() == 42
    assert out == [_delta("hello there"), _delta(" world"), b"data: [DONE]\n\n"]


def test_the_client_that_asked_for_usage_gets_the_chunk() -> None:
    relay = SseRelay(prompt=3, client_wants_usage=True)
    assert relay.feed(USAGE) == [USAGE]


def test_without_usage_the_text_is_counted() -> None:
    relay = SseRelay(prompt=5, client_wants_usage=False)
    relay.feed(_delta("one two", usage=None) + _delta(" three", usage=None))
    relay.feed(b'data: {"choices": [{"index": 0, "text": "four"}], "usage" :  null}')
    relay.flush()
    expected = count_tokens("one two") + count_tokens(" three") + count_tokens("four")
    assert relay.charged() == 5 + expected


def test_a_quoted_usage_inside_the_text_is_text() -> None:
    relay = SseRelay(prompt=1, client_wants_usage=False)
    relay.feed(_delta('the "usage": {"total_tokens": 999} is text'))
    assert relay.charged() == 1 + count_tokens('the "usage": {"total_tokens": 999} is text')


def test_a_long_stream_without_usage_holds_a_bounded_amount_and_counts_all() -> None:
    relay = SseRelay(prompt=0, client_wants_usage=False)
    words = 20_000
    most_held = 0
    for _ in range(words):
        relay.feed(_delta(" word"))
        most_held = max(most_held, relay._uncounted_bytes)
    assert most_held <= relay_module._COUNT_AT + 200  # one event past the mark at most
    assert relay.charged() == words * count_tokens(" word")

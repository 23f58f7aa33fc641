"""Request bodies: validated by hand (fast, with errors naming the field), documented for
OpenAPI from pydantic models. Unknown fields are allowed and forwarded: model servers take
extras (vLLM's ``top_k``, ``guided_json``, ...).

The two agree: a body the schema admits is not refused (the fuzz test holds them to it). So
a whole number written ``37.0`` is an integer, as JSON Schema's ``integer`` says (and
pydantic, so vLLM, reads it); it is counted as ``37``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from .backends import MOCK_MODEL

__all__ = ["REQUEST_SCHEMAS", "validate_body"]

MAX_OUTPUT_TOKENS = 10_000_000
MAX_N = 128


def _is_int(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def validate_body(route: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """``(param, problem)`` for the first invalid field, or None when the body is usable (its
    counts then ints: ``max_tokens`` etc. written as ``37.0`` are made ``37`` in ``body``)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return "model", "expected a string"
    if route == "chat":
        messages = body.get("messages")
        if messages is None:
            return "messages", "required field missing"
        if not isinstance(messages, list) or not messages:
            return "messages", "expected a non-empty list of messages"
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{i}]", "expected an object with role and content"
            if not isinstance(message.get("role"), str):
                return f"messages[{i}].role", "expected a string"
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                return f"messages[{i}].content", "expected a string or a list of parts"
    else:
        prompt = body.get("prompt")
        if prompt is None:
            return "prompt", "required field missing"
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list)
            and prompt
            and (
                all(isinstance(p, str) for p in prompt)
                or all(_is_int(p) for p in prompt)
                or all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)
            )
        ):
            return "prompt", "expected a string, a list of strings, or token ids"
    for name, most in (
        ("max_tokens", MAX_OUTPUT_TOKENS),
        ("max_completion_tokens", MAX_OUTPUT_TOKENS),
        ("n", MAX_N),
    ):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or not 1 <= value <= most:
                return name, f"expected an integer from 1 to {most}"
            if value.__class__ is float:
                body[name] = int(value)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "stream", "expected true or false"
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "stream_options", "expected an object"
    return None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, examples=[MOCK_MODEL])
    max_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None


class ChatCompletionRequest(_Common):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1)]
    )


def _request_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    if defs:  # inline the one nested definition so the path entry stands alone
        schema = _inline(schema, defs)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


REQUEST_SCHEMAS = {
    "chat": _request_body(ChatCompletionRequest),
    "completions": _request_body(CompletionRequest),
}

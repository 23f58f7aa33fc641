"""An OpenAI-compatible upstream that fails on purpose, served by a real uvicorn process:
``POST /v1/...`` answers 500 with a JSON error; ``/garbage/v1/...`` answers 200 with a body
that is not JSON. (``uvicorn faulty_upstream:app --app-dir tests/reliability``)"""

from __future__ import annotations

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"].startswith("/garbage/"):
        status, body, kind = 200, b"<html>not json</html>", b"text/html"
    else:
        status, body, kind = 500, b'{"error": {"message": "model crashed"}}', b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})

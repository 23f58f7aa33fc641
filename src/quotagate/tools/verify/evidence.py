"""The evidence record: each request and what came back (``Exchange``), each verdict with the
exchanges that prove it (``Check``), the HTTP client that keeps them, and the JSON record of a
run (``--report``)."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ... import __version__
from ...identity import mask_key
from .._common import ToolError, mask_password

__all__ = ["Check", "Client", "Exchange", "evidence_record"]


@dataclass(slots=True)
class Exchange:
    """One request and what came back, as the evidence record keeps it (key masked)."""

    method: str
    path: str
    key: str | None  # masked
    status: int
    headers: dict[str, str]
    body: Any
    at: float  # seconds since verify started
    elapsed_ms: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def int_header(self, name: str) -> int | None:
        value = self.headers.get(name)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {
            "request": {"method": self.method, "path": self.path, "key": self.key},
            "response": {"status": self.status, "headers": self.headers, "body": self.body},
            "at_s": round(self.at, 4),
            "elapsed_ms": round(self.elapsed_ms, 2),
        }

    def line(self) -> str:
        """The exchange in one line for people: status, rate-limit headers, error body."""
        who = f" [{self.key}]" if self.key else ""
        parts = [f"{self.method} {self.path}{who} -> {self.status}"]
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
            if name in self.headers:
                parts.append(f"{name} {self.headers[name]}")
        for name in ("x-ratelimit-remaining-requests", "retry-after", "retry-after-ms"):
            if name in self.headers:
                parts.append(f"{name} {self.headers[name]}")
        if self.status >= 400:
            parts.append(json.dumps(self.body) if not isinstance(self.body, str) else self.body)
        return " · ".join(parts)


@dataclass(slots=True)
class Check:
    """A check's verdict, the one-line reason, and the exchanges that prove it."""

    name: str
    title: str
    passed: bool
    reason: str
    exchanges: list[Exchange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # evidence lines for people

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "reason": self.reason,
            "notes": self.notes,
            "evidence": [exchange.to_json() for exchange in self.exchanges],
        }


def _relevant_headers(headers: httpx.Headers) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name.startswith(("x-ratelimit", "ratelimit", "retry-after")) or name == "content-type"
    }


def _body(response: httpx.Response) -> Any:
    """The body as evidence: JSON (a 200 completion reduced to id/model/usage) or short text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text
        return text if len(text) <= 300 else text[:300] + "…"
    if response.status_code == 200 and isinstance(body, dict) and "choices" in body:
        return {k: body[k] for k in ("id", "object", "model", "usage") if k in body}
    return body


class Client:
    """httpx with the evidence bookkeeping, and connection errors turned into exit 2.

    Args:
        base_url: the gateway, ``http(s)://host:port``.
        timeout: seconds per request.
        started: ``time.perf_counter()`` when verify started: each exchange's ``at`` counts
            from it.
    """

    def __init__(self, base_url: str, timeout: float, started: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.started = started
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def call(
        self, method: str, path: str, key: str | None = None, body: dict[str, Any] | None = None
    ) -> Exchange:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        begin = time.perf_counter()
        try:
            response = self.http.request(method, path, headers=headers, json=body)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            detail = str(exc) or type(exc).__name__
            where = mask_password(self.base_url + path)
            raise ToolError(f"cannot reach {where}: {detail}") from None
        elapsed = time.perf_counter() - begin
        return Exchange(
            method=method,
            path=path,
            key=mask_key(key) if key else None,
            status=response.status_code,
            headers=_relevant_headers(response.headers),
            body=_body(response),
            at=begin - self.started,
            elapsed_ms=elapsed * 1000,
        )

    def json(self, path: str, key: str | None = None) -> tuple[int, Any]:
        exchange = self.call("GET", path, key)
        return exchange.status, exchange.body

    def close(self) -> None:
        self.http.close()


def evidence_record(
    command: str, started_at: dt.datetime, environment: dict[str, Any], checks: list[Check]
) -> dict[str, Any]:
    """The ``--report`` JSON: the command, when, the starting state, every check's evidence;
    ``passed`` only when there were checks and every one passed."""
    return {
        "version": __version__,
        "command": command,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "passed": bool(checks) and all(check.passed for check in checks),
        "environment": environment,
        "checks": [check.to_json() for check in checks],
    }

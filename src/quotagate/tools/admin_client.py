"""``quotagate keys create|list|show|update|revoke|rotate --url URL``: the admin API from a shell.

The admin key comes from ``QUOTAGATE_ADMIN_KEY`` or ``--admin-key-file`` (never a flag: flags
end up in shell histories and process lists). A new secret is printed once, on create and
rotate, on a line of its own; everything else is the key's fields. ``--json`` prints the API's
answer as it is. An answer of the API that is an error is printed as ``error: <code>: <message>``
with exit code 1; no gateway at the URL, or no admin key, is a one-line error with exit code 2.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import click
import httpx

from ._common import ToolError

__all__ = ["AdminClient", "admin_key", "print_key", "print_keys", "print_usage"]

ENV = "QUOTAGATE_ADMIN_KEY"
_FIELDS = ("id", "name", "tier", "masked", "source", "created_at", "expires_at", "revoked_at")


def admin_key(key_file: str | None) -> str:
    """The admin key from ``--admin-key-file`` or ``QUOTAGATE_ADMIN_KEY``."""
    if key_file is not None:
        try:
            key = Path(key_file).read_text("utf-8").strip()
        except OSError as exc:
            raise ToolError(f"--admin-key-file: cannot read {key_file}: {exc.strerror}") from None
    else:
        key = os.environ.get(ENV, "").strip()
    if not key:
        raise ToolError(f"no admin key: set {ENV} or give --admin-key-file FILE")
    return key


class AdminClient:
    """One admin API call at a time, as the CLI makes them."""

    def __init__(self, url: str, key: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            answer = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ToolError(f"cannot reach the gateway at {self.url}: {exc}") from None
        try:
            data = answer.json()
        except ValueError:
            data = None
        if answer.status_code >= 400:
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                click.echo(f"error: {data['error']}: {data.get('message', '')}", err=True)
            else:
                click.echo(f"error: HTTP {answer.status_code}: {answer.text[:200]}", err=True)
            raise SystemExit(1)
        return data

    def close(self) -> None:
        self._client.close()


def print_key(key: dict[str, Any], as_json: bool) -> None:
    """A key's fields, one per line, the secret first when the answer has one."""
    if as_json:
        click.echo(json.dumps(key, indent=2))
        return
    if key.get("key"):
        click.echo(f"secret (shown this once): {key['key']}")
    for name in (*_FIELDS, "last_used_at"):
        if key.get(name) is not None:
            click.echo(f"{name:13} {key[name]}")
    if key.get("limits"):
        click.echo(f"{'limits':13} {json.dumps(key['limits'])}")
    if key.get("models") is not None:
        click.echo(f"{'models':13} {', '.join(key['models'])}")


def print_keys(keys: list[dict[str, Any]], as_json: bool) -> None:
    """The list as a table: id, name, tier, masked, source, state, last use."""
    if as_json:
        click.echo(json.dumps(keys, indent=2))
        return
    rows = [("id", "name", "tier", "masked", "source", "state", "last used")]
    for key in keys:
        state = "revoked" if key.get("revoked_at") else "active"
        if state == "active" and key.get("expires_at"):
            state = f"expires {key['expires_at']}"
        rows.append(
            (
                key["id"],
                key.get("name") or "",
                key["tier"],
                key["masked"],
                key["source"],
                state,
                key.get("last_used_at") or "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def print_usage(answer: dict[str, Any], as_csv: bool) -> None:
    """The ledger's rows as a table (with a total line) or as CSV."""
    group = str(answer["group_by"])
    columns = (
        group,
        "requests_admitted",
        "requests_rejected",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    )
    data = answer["data"]
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row.get(c, 0) for c in columns] for row in data)
        click.echo(out.getvalue(), nl=False)
        return
    click.echo(f"usage {answer['from']} .. {answer['to']} by {group}")
    total: list[object] = ["total", *(sum(int(row[c]) for row in data) for c in columns[1:-1])]
    total.append(round(sum(float(row.get("cost_usd", 0)) for row in data), 6))
    table = [list(columns), *([row.get(c, 0) for c in columns] for row in data), total]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(columns))]
    for row in table:
        cells = [
            str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        click.echo("  ".join(cells))

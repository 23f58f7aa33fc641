"""``quotagate bench``: load-test a gateway the way ``hey`` does, and see its limits at work.

It sends N requests (or keeps going for a duration) at concurrency C, rotating API keys so
per-key limits are exercised, and sums up what an operator tuning tiers wants to know: how many
requests were admitted and how many got 429, the latency, the rate-limit headers seen, and for
streams the time to first token. The load comes from ``loadgen`` (raw keep-alive connections),
so the tool is not the bottleneck; the summary, its text and the plot from ``_bench_report``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from ..gateway.backends import MOCK_MODEL
from ..identity import mask_key
from ._bench_report import by_key, plot, render_text, summarize
from ._common import OneLineErrorsCommand, ToolError
from .loadgen import ConnectError, LoadResult, parse_target, render_request, run_load

__all__ = ["bench_command"]

T = TypeVar("T")

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"10s"``, ``"1m"``, ``"500ms"``, ``"1.5"`` (seconds) -> seconds, as hey's ``-z`` reads."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ToolError(f'-z: expected a duration like "10s", "1m" or "500ms" (got {text!r})')
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_body(path: str, model: str) -> dict[str, Any] | None:
    """A small request for an OpenAI route, so ``quotagate bench URL/v1/completions`` just
    works; None for any other path (then GET with no body, like hey)."""
    route = path.split("?", 1)[0].rstrip("/")
    if route.endswith("/chat/completions"):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    if route.endswith("/completions"):
        return {"model": model, "prompt": "hi", "max_tokens": 16}
    return None


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it comes with uvicorn[standard]): a faster loop
    means more of the core goes to sending requests."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _headers(header_texts: tuple[str, ...]) -> list[tuple[str, str]]:
    headers = []
    for text in header_texts:
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise ToolError(f'-H: expected "Name: value" (got {text!r})')
        headers.append((name.strip(), value.strip()))
    return headers


@click.command(
    "bench", cls=OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("url")
@click.option(
    "-n",
    "total",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Requests to send.",
)
@click.option(
    "-c",
    "concurrency",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Connections sending at once.",
)
@click.option(
    "-z",
    "duration",
    metavar="DURATION",
    help='Send for this long instead ("10s", "1m", "500ms"); -n is then ignored.',
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="KEY",
    help="API key (Authorization: Bearer); repeat to rotate keys round-robin.",
)
@click.option(
    "--stream",
    is_flag=True,
    help='Ask for "stream": true; report time to first token and tokens/s.',
)
@click.option(
    "-m",
    "method",
    type=click.Choice(METHODS, case_sensitive=False),
    help="HTTP method (default: POST with a body, else GET).",
)
@click.option(
    "-d",
    "body",
    metavar="BODY",
    help="Request body (default for /completions routes: a small request to --model).",
)
@click.option("-D", "body_file", type=click.File("rb"), help="Request body from a file.")
@click.option(
    "-H", "header_texts", multiple=True, metavar='"NAME: VALUE"', help="Extra header; repeatable."
)
@click.option(
    "-T",
    "content_type",
    default="application/json",
    show_default=True,
    help="Content-Type of the body.",
)
@click.option(
    "--model",
    default=MOCK_MODEL,
    show_default=True,
    help="Model of the default request body.",
)
@click.option(
    "-t",
    "timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Seconds before a request counts as failed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    metavar="FILE.png",
    help="Draw requests over time by outcome and latency (needs quotagate[plot]).",
)
def bench_command(
    url: str,
    total: int,
    concurrency: int,
    duration: str | None,
    keys: tuple[str, ...],
    stream: bool,
    method: str | None,
    body: str | None,
    body_file: Any,
    header_texts: tuple[str, ...],
    content_type: str,
    model: str,
    timeout: float,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Load-test URL like hey: N requests (or for -z) at concurrency C, keys round-robin.

    Prints status counts (admitted vs 429), req/s, latency p50/p90/p99/max, the rate-limit
    headers seen and, with --stream, time to first token and tokens/s. Exit 2 when the URL
    cannot be reached or an option is wrong.
    """
    try:
        target = parse_target(url)
    except ValueError as exc:
        raise ToolError(f"URL: {exc}") from None
    seconds = parse_duration(duration) if duration is not None else None
    if body is not None and body_file is not None:
        raise ToolError("give -d or -D, not both")
    payload: bytes | None
    if body_file is not None:
        payload = body_file.read()
    elif body is not None:
        payload = body.encode()
    else:
        default = default_body(target.path, model)
        payload = None if default is None else json.dumps(default).encode()
    if stream:
        try:
            document = json.loads(payload or b"")
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ToolError("--stream needs a JSON object body (give -d '{...}')")
        document["stream"] = True
        payload = json.dumps(document).encode()
    verb = (method or ("POST" if payload is not None else "GET")).upper()
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ToolError("--plot needs matplotlib: pip install 'quotagate[plot]'") from None

    headers = [("User-Agent", "quotagate-bench"), ("Accept", "*/*")]
    if payload is not None:
        headers.append(("Content-Type", content_type))
    headers += _headers(header_texts)
    requests = [
        render_request(target, verb, [*headers, ("Authorization", f"Bearer {key}")], payload)
        for key in keys
    ] or [render_request(target, verb, headers, payload)]

    masked = ", ".join(mask_key(key) for key in keys) or "no key"
    size = f"for {duration}" if seconds is not None else f"{total} requests"
    heading = (
        f"quotagate bench · {verb} {target.url} · {size} · {concurrency} connections · "
        f"keys: {masked}" + (" · stream" if stream else "")
    )
    result = _run(
        _bench(target, requests, concurrency, total, seconds, timeout, stream, show_progress=True)
    )
    summary = summarize(result)
    summary = {
        "url": target.url,
        "method": verb,
        "concurrency": concurrency,
        "keys": [mask_key(key) for key in keys],
        **summary,
        "by_key": by_key(result, keys),
    }
    if plot_path is not None:
        plot(result, plot_path, heading)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        click.echo(render_text(summary, heading))
        if plot_path is not None:
            click.echo(f"\nPlot written to {plot_path}")


async def _bench(
    target: Any,
    requests: list[bytes],
    concurrency: int,
    total: int,
    seconds: float | None,
    request_timeout: float,
    stream: bool,
    *,
    show_progress: bool,
) -> LoadResult:
    """Run the load with a progress bar on stderr (only when stderr is a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]} requests"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,  # refreshed from the event loop: no thread competing for the GIL
        transient=True,
        disable=not (show_progress and console.is_terminal),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with progress:
        task = progress.add_task("bench", total=seconds if seconds is not None else total, done=0)

        def on_progress(done: int) -> None:
            completed = loop.time() - started if seconds is not None else done
            progress.update(task, completed=completed, done=done)
            progress.refresh()

        try:
            return await run_load(
                target,
                requests,
                concurrency=concurrency,
                total=None if seconds is not None else total,
                duration=seconds,
                request_timeout=request_timeout,
                stream=stream,
                on_progress=on_progress,
            )
        except ConnectError as exc:
            raise ToolError(str(exc)) from None

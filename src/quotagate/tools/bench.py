"""``quotagate bench``: load-test a gateway the way ``hey`` does, and see its limits at work.

It sends N requests (or keeps going for a duration) at concurrency C, rotating API keys so
per-key limits are exercised, and sums up what an operator tuning tiers wants to know: how many
requests were admitted and how many got 429, the latency, the rate-limit headers seen, and for
streams the time to first token. The load comes from ``loadgen`` (raw keep-alive connections),
so the tool is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from ..gateway.backends import MOCK_MODEL
from ..identity import mask_key
from ._common import OneLineErrorsCommand, ToolError, percentile
from .loadgen import NO_RESPONSE, ConnectError, LoadResult, parse_target, render_request, run_load

__all__ = ["bench_command", "summarize"]

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


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _distribution(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": _ms(percentile(ordered, 0.50)),
        "p90": _ms(percentile(ordered, 0.90)),
        "p99": _ms(percentile(ordered, 0.99)),
        "max": _ms(ordered[-1] if ordered else 0.0),
    }


def summarize(result: LoadResult) -> dict[str, Any]:
    """The run as the JSON summary (``--json``): counts, req/s, latency, headers, streams."""
    counts: dict[int, int] = {}
    for status in result.statuses:
        counts[status] = counts.get(status, 0) + 1
    answered = [
        latency
        for latency, status in zip(result.latencies, result.statuses, strict=True)
        if status != NO_RESPONSE
    ]
    requests = len(result.statuses)
    summary: dict[str, Any] = {
        "requests": requests,
        "status_counts": {str(code): counts[code] for code in sorted(counts) if code},
        "errors": dict(sorted(result.errors.items())),
        "duration_s": round(result.duration, 4),
        "rps": round(requests / result.duration, 1) if result.duration > 0 else 0.0,
        "latency_ms": _distribution(answered),
        "ratelimit": {
            "min_remaining": result.min_remaining,
            "retry_after": dict(
                sorted(result.retry_after.items(), key=lambda item: _number(item[0]))
            ),
        },
        "stream": None,
    }
    if result.ttft:
        tokens = sum(result.stream_tokens)
        per_stream = sorted(
            count / seconds
            for count, seconds in zip(result.stream_tokens, result.stream_generation, strict=True)
            if seconds > 0 and count > 1
        )
        summary["stream"] = {
            "streams": len(result.ttft),
            "ttft_ms": _distribution(result.ttft),
            "tokens": tokens,
            "tokens_per_s": round(tokens / result.duration, 1) if result.duration > 0 else 0.0,
            "tokens_per_s_per_stream_p50": round(percentile(per_stream, 0.5), 1),
        }
    return summary


def by_key(result: LoadResult, keys: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Status counts per key (masked), in key order: what each key's tier let through."""
    if not keys:
        return {}
    counts: list[dict[str, int]] = [{} for _ in keys]
    for key, status in zip(result.keys, result.statuses, strict=True):
        code = str(status) if status != NO_RESPONSE else "error"
        counts[key][code] = counts[key].get(code, 0) + 1
    return {
        f"{i + 1}: {mask_key(key)}": dict(sorted(counts[i].items())) for i, key in enumerate(keys)
    }


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def render_text(summary: dict[str, Any], heading: str) -> str:
    """The summary for people, laid out like hey's."""
    counts: dict[str, int] = summary["status_counts"]
    admitted = sum(n for code, n in counts.items() if code.startswith("2"))
    limited = counts.get("429", 0)
    other = summary["requests"] - admitted - limited
    latency = summary["latency_ms"]
    lines = [
        heading,
        "",
        "Summary:",
        f"  Total:         {summary['duration_s']:.4f} s",
        f"  Requests:      {summary['requests']}",
        f"  Requests/sec:  {summary['rps']:.1f}",
        "",
        "Status codes:",
        f"  2xx (admitted)   {admitted}",
        f"  429 (limited)    {limited}",
        f"  other            {other}",
    ]
    detail = ", ".join(f"[{code}] {n}" for code, n in counts.items())
    if detail:
        lines.append(f"  by code          {detail}")
    if summary["errors"]:
        errors = ", ".join(f"{kind} {n}" for kind, n in summary["errors"].items())
        lines.append(f"  no response      {errors}")
    for key, key_counts in summary.get("by_key", {}).items():
        detail = ", ".join(f"[{code}] {n}" for code, n in key_counts.items())
        lines.append(f"  key {key:<12} {detail}")
    lines += [
        "",
        "Latency (ms):",
        f"  p50 {latency['p50']:.2f}   p90 {latency['p90']:.2f}   "
        f"p99 {latency['p99']:.2f}   max {latency['max']:.2f}",
        "",
        "Rate-limit headers:",
    ]
    ratelimit = summary["ratelimit"]
    remaining = ratelimit["min_remaining"]
    lines.append(
        "  min X-RateLimit-Remaining   " + ("none seen" if remaining is None else str(remaining))
    )
    retry = ratelimit["retry_after"]
    lines.append(
        "  Retry-After (s)             "
        + (", ".join(f"{value} x{n}" for value, n in retry.items()) if retry else "none seen")
    )
    stream = summary["stream"]
    if stream is not None:
        ttft = stream["ttft_ms"]
        lines += [
            "",
            f"Streams ({stream['streams']}):",
            f"  time to first token (ms)   p50 {ttft['p50']:.2f}   p90 {ttft['p90']:.2f}   "
            f"p99 {ttft['p99']:.2f}   max {ttft['max']:.2f}",
            f"  tokens                     {stream['tokens']} · {stream['tokens_per_s']:.1f}/s "
            f"overall · {stream['tokens_per_s_per_stream_p50']:.1f}/s per stream (p50)",
        ]
    return "\n".join(lines)


def plot(result: LoadResult, path: str, title: str) -> None:
    """Requests over time by outcome (admitted, 429, other) and latency, as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = max(result.duration, 1e-3)
    bins = max(1, min(100, len(result.starts) // 20 or 1))
    width = duration / bins
    edges = [i * width for i in range(bins + 1)]
    outcomes: dict[str, tuple[Callable[[int], bool], str]] = {
        "admitted (2xx)": (lambda s: 200 <= s < 300, "tab:green"),
        "limited (429)": (lambda s: s == 429, "tab:orange"),
        "other / no response": (lambda s: not (200 <= s < 300 or s == 429), "tab:red"),
    }
    figure, (rate_axes, latency_axes) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 6.5), constrained_layout=True
    )
    bottom = [0.0] * bins
    for label, (belongs, colour) in outcomes.items():
        heights = [0.0] * bins
        times: list[float] = []
        latencies: list[float] = []
        for start, latency, status in zip(
            result.starts, result.latencies, result.statuses, strict=True
        ):
            if belongs(status):
                heights[min(int(start / width), bins - 1)] += 1 / width
                times.append(start)
                latencies.append(latency * 1000)
        if not times:
            continue
        rate_axes.bar(
            edges[:-1], heights, width=width, bottom=bottom, align="edge", color=colour, label=label
        )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        latency_axes.scatter(times, latencies, s=4, color=colour, alpha=0.5, label=label)
    rate_axes.set_ylabel("requests/s (by send time)")
    rate_axes.set_title(title, fontsize=9)
    rate_axes.legend(loc="upper right", fontsize=8)
    latency_axes.set_ylabel("latency (ms)")
    latency_axes.set_xlabel("time since start (s)")
    latency_axes.set_yscale("log")
    latency_axes.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    latency_axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    latency_axes.legend(loc="upper right", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


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

"""What ``quotagate bench`` reports of a run: the JSON summary, the text for people, the plot.

A ``LoadResult`` is raw observations, one entry per request; the operator tuning tiers wants
them summed up: admitted against limited, req/s, latency percentiles, the rate-limit headers
seen, per key what its tier let through and, for streams, time to first token and tokens/s.
Kept apart from ``bench``, the click command (options to rendered requests, the run, the
output), so that each reads in one piece: there the steps, here the arithmetic and the layout.
``plot`` imports matplotlib (``quotagate[plot]``) only when called, so ``import quotagate.cli``
never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..identity import mask_key
from ._common import percentile
from .loadgen import NO_RESPONSE, LoadResult

__all__ = ["by_key", "plot", "render_text", "summarize"]


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

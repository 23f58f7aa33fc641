"""``quotagate bench`` against ``hey`` on the same trivial server, in one run.

The issue asks that the tool's own overhead not be the bottleneck: against the same server it
must reach at least 80% of the requests per second that ``hey`` reaches. The server (a bare ASGI
app under uvicorn with uvloop and httptools, the gateway's own stack) is pinned to one core and
both load generators to another, with taskset, so they never compete for a CPU. Rounds alternate
the order of the two tools; the medians and their ratio are printed, with the CPU time each
generator spent per request (the efficiency behind the figure).

    .venv/bin/python benchmarks/bench_vs_hey.py [-n 50000] [-c 50] [--rounds 5]

Needs ``hey`` and ``taskset`` on PATH and two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from quotagate.testing import ServerProcess

HERE = Path(__file__).resolve().parent


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The trivial server: 200 "ok" to everything."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _server(core: int) -> ServerProcess:
    command = [
        "taskset", "-c", str(core), sys.executable, "-m", "uvicorn", "bench_vs_hey:app",
        "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", "{port}",
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    return ServerProcess(command, name="trivial-server", port_retries=2)


def _timed(command: list[str]) -> tuple[str, float]:
    """Run a command; return its stdout and the CPU seconds (user + sys) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{command[3]} failed ({done.returncode}): {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, cpu


def run_hey(core: int, url: str, requests: int, connections: int) -> tuple[float, float]:
    out, cpu = _timed(
        ["taskset", "-c", str(core), "hey", "-n", str(requests), "-c", str(connections), url]
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    ok = re.search(r"\[200\]\s+(\d+) responses", out)
    if ok is None or int(ok.group(1)) != requests:
        raise SystemExit(f"hey did not get {requests} 200s:\n{out}")
    return rps, cpu


def run_quotagate(core: int, url: str, requests: int, connections: int) -> tuple[float, float]:
    command = [
        "taskset", "-c", str(core), sys.executable, "-m", "quotagate", "bench", url,
        "-n", str(requests), "-c", str(connections), "--json",
    ]  # fmt: skip
    out, cpu = _timed(command)
    summary = json.loads(out)
    if summary["status_counts"] != {"200": requests}:
        raise SystemExit(f"quotagate bench did not get {requests} 200s: {summary}")
    return float(summary["rps"]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=50_000)
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    args = parser.parse_args()
    for tool in ("hey", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores: one for the server, one for the load generators")

    hey: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with _server(args.server_core) as server:
        url = f"{server.url}/"
        # One short warm-up each, not counted (imports, page cache, TCP ports).
        run_hey(args.client_core, url, 2000, args.connections)
        run_quotagate(args.client_core, url, 2000, args.connections)
        for round_ in range(args.rounds):
            order = [("hey", run_hey), ("quotagate", run_quotagate)]
            if round_ % 2:
                order.reverse()
            for name, runner in order:
                result = runner(args.client_core, url, args.requests, args.connections)
                (hey if name == "hey" else ours).append(result)
                print(f"round {round_ + 1}: {name:<15} {result[0]:>9.0f} req/s", flush=True)

    hey_rps = statistics.median(r for r, _ in hey)
    our_rps = statistics.median(r for r, _ in ours)
    hey_cpu = statistics.median(cpu for _, cpu in hey) / args.requests * 1e6
    our_cpu = statistics.median(cpu for _, cpu in ours) / args.requests * 1e6
    print()
    print(
        f"server pinned to core {args.server_core}, load generators to core "
        f"{args.client_core}; {args.requests} requests at {args.connections} connections, "
        f"{args.rounds} rounds, medians"
    )
    print(f"{'tool':<17}{'req/s':>10}{'client CPU µs/request':>25}")
    print(f"{'hey':<17}{hey_rps:>10.0f}{hey_cpu:>25.1f}")
    print(f"{'quotagate bench':<17}{our_rps:>10.0f}{our_cpu:>25.1f}")
    print(f"ratio quotagate bench / hey: {our_rps / hey_rps:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()

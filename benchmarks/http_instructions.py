"""Instructions per request of the apps of ``benchmarks/http.py``, counted exactly.

Throughput on a shared 2-core VM moves by up to 15% between runs of the same code; instruction
counts do not. Each variant of ``benchmarks/http_apps.py`` (memory storage, one key) is served
by uvicorn (one worker, uvloop, httptools) under ``valgrind --tool=callgrind`` twice, in
parallel: once for ``--requests`` A and once for B requests sent by ``hey -c 10`` with the
one-key load of ``benchmarks/http.py``. The difference of the two totals divided by B - A is
the cost of one request in the server process's user space (start-up and warm-up cancel out;
kernel time is not counted). Printed per variant: instructions per request and bare's count
over the variant's (what ``x bare`` in ``http.py`` would read on a machine where only
instructions mattered).

Run:  .venv/bin/python benchmarks/http_instructions.py [--variants bare,bare-headers,...]
          [--requests 1000,3000]
Needs ``valgrind`` and ``hey`` on PATH; about a minute per variant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quotagate.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bare", "bare-headers", "inline", "slowapi-memory", "quotagate-memory")
ENDPOINT = "/v1/completions"
START_TIMEOUT = 300.0  # uvicorn under valgrind takes tens of seconds to import


def serve_and_count(variant: str, requests: int) -> int:
    """Total instructions of a uvicorn process that started, answered ``requests``, stopped."""
    library = variant.removesuffix("-memory")
    env = {
        **os.environ,
        "HTTP_BENCH_LIBRARY": library,
        "HTTP_BENCH_STORAGE": "memory://",
        "HTTP_BENCH_RATE": "1000000/minute",
    }
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, "-m", "uvicorn", "http_apps:app", "--app-dir", "benchmarks"]
    command += ["--port", "{port}", "--loop", "uvloop", "--http", "httptools"]
    command += ["--no-access-log", "--log-level", "warning"]
    # SIGINT: uvicorn shuts down and callgrind prints its total as the process exits.
    server = ServerProcess(
        command,
        name=f"{variant}-{requests}",
        env=env,
        cwd=ROOT,
        startup_timeout=START_TIMEOUT,
        port_retries=2,
        stop_signal=signal.SIGINT,
        stop_timeout=120,
    )
    with server:
        try:
            load = ["hey", "-n", str(requests), "-c", "10", "-m", "POST", "-H"]
            load += ["X-API-Key: bench-key-1", "-T", "application/json", "-d", '{"prompt":"hi"}']
            out = subprocess.run(
                [*load, f"http://127.0.0.1:{server.port}{ENDPOINT}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
            if statuses != [("200", str(requests))]:
                raise RuntimeError(f"{variant}: expected {requests} answers 200, got {statuses}")
        finally:
            server.stop()
        text = server.output()
    match = re.search(r"Collected : (\d+)", text)
    if match is None:
        raise RuntimeError(f"{variant}: no callgrind total in the server's output:\n{text}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", default="1000,3000", help="A,B: two request counts")
    args = parser.parse_args()
    for tool in ("valgrind", "hey"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH (apt-get install -y {tool})")
    low, high = (int(n) for n in args.requests.split(","))
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown or high <= low:
        raise SystemExit(f"variants are {', '.join(VARIANTS)}; --requests A,B needs B > A")
    per_request: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for variant in variants:
            a, b = pool.map(lambda n, v=variant: serve_and_count(v, n), (low, high))
            per_request[variant] = (b - a) / (high - low)
            print(f"{variant:<17} {per_request[variant]:>10,.0f} instructions per request")
    base = per_request.get("bare")
    print(f"\n{'variant':<17} {'instr/req':>10} {'x bare':>7}")
    for variant, count in per_request.items():
        ratio = f"{base / count:7.2f}" if base else "      -"
        print(f"{variant:<17} {count:>10,.0f} {ratio}")


if __name__ == "__main__":
    main()

"""What the quotagate gateway costs in front of a model server, and how it compares to LiteLLM.

One run measures three columns against the same upstream, quotagate's mock model served alone
(``python -m quotagate mock --port P --tokens-per-second 0``: an OpenAI-compatible server that
answers at once):

    direct     the upstream itself
    quotagate  ``python -m quotagate serve --config FILE --port P2``: ``[backend] kind = "openai"``
               at ``http://127.0.0.1:P/v1``, ``memory://`` storage, one key in a tier with limits
               no run comes near: requests "10000000/minute", tokens "1000000000/minute",
               concurrency 1000; ``[backend] max_concurrency = 1000`` (above every load's
               connections), ``--log-level warning`` (no access log)
    litellm    LiteLLM's proxy (``litellm[proxy]`` from PyPI, in its OWN venv, never in .venv;
               ``--litellm PATH`` names its ``litellm`` command or its venv's ``python``),
               configured by ``benchmarks/gateway_litellm_config.yaml``: one ``model_list`` entry
               ``{model: openai/quotagate-mock, api_base: http://127.0.0.1:P/v1, api_key: dummy}``,
               no database, no Redis, no callbacks, ``LITELLM_LOG=ERROR`` (no access log, as for
               quotagate), ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no download at start).
               Per-key limits: LiteLLM keeps them on virtual keys, which need its Postgres
               database. Without one, the config sets ``general_settings.custom_auth`` to
               ``benchmarks/gateway_litellm_auth.py``, which gives the bench key
               ``rpm_limit=10000000``, ``tpm_limit=1000000000`` and
               ``max_parallel_requests=1000`` (quotagate's tier, limit for limit); LiteLLM's
               default rate limiter (parallel_request_limiter_v3) enforces them per key in
               process memory, as it does for a virtual key (checked: with rpm_limit=3 the 4th
               request gets LiteLLM's 429). ``custom_auth_run_common_checks: true`` keeps
               LiteLLM's usual per-request key checks; ``master_key`` is set (LiteLLM refuses to
               start without one) but is not the key the load uses. Without ``--litellm``, or
               when it cannot start, the column is skipped with a message saying why.

Loads, each against every column (loopback, keep-alive):

    c10, c50   10 / 50 keep-alive connections for ``--duration`` s, each sending
               ``POST URL/v1/chat/completions`` with ``Authorization: Bearer KEY`` and
               ``{"model": "quotagate-mock", "messages": [{"role": "user", "content":
               "Hello"}], "max_tokens": 16}``: req/s, p50, p99, statuses. ``--loadgen wrk``
               (default): ``wrk -t1 -c10 -s benchmarks/gateway_wrk.lua`` (C, one pre-rendered
               request: the lightest load generator, which matters in the split layout where
               the upstream shares its core; statuses as 2xx / non-2xx). ``--loadgen hey``:
               ``hey -z 10s -c 10 -m POST ...`` (Go; prints latencies to 0.1 ms and every
               status; it needs about as much CPU per request as the mock model itself)
    ttft       the same body with ``"stream": true``, ``--streams`` requests (default 2000) from
               this script's own asyncio client over 10 keep-alive connections: the time from
               writing a request to the first SSE ``data:`` event whose ``delta.content`` is not
               empty; p50, p99, streams/s; every stream must answer 200 and end in
               ``data: [DONE]``

Method (``--layout``), with ``taskset``:

    split      (default) the process under test has core 0 to itself: for ``direct`` that is
               the mock; for a proxy column the proxy, while the mock moves (``taskset -a -p``)
               to core 1 beside the load generator and this script (the stream client). In
               production the model server is on a GPU host of its own and the gateway's CPU
               is the gateway's: this layout measures what the proxy itself can carry.
    shared     the mock and every proxy on core 0, the load generator and this script on
               core 1: a proxy and its upstream fight for one core (the worst case: every
               proxied request costs the upstream's work plus the proxy's on the same core).

Servers start once, on free loopback ports, each waited for until it answers, checked with
one normal and one streamed request, warmed up (1 s of the load generator at 50 connections
and 100 streams) and stopped by pid at the end (TERM, then KILL; try/finally).
``--rounds`` rounds (default 3) interleave the columns: every load runs on each column in turn,
in an order rotated every round, so that a slow spell on the machine hits all of them. Figures
are medians over rounds; ratios and differences are taken between columns of the SAME round,
then the median over rounds is reported:

    added p50    quotagate p50 - direct p50 (ms), at 10 and 50 connections and for TTFT
    share        quotagate req/s / direct req/s
    vs litellm   for every figure, how many times better quotagate is (req/s: quotagate /
                 litellm; latencies: litellm / quotagate); above 1 means quotagate is better

Targets (from the issue): quotagate adds under 1 ms at p50 at 10 connections, keeps at least
60% of the direct req/s, and beats LiteLLM's proxy on every figure.

Every measurement also records the CPU time the column's own servers spent per answered
request (``/proc/PID/stat``; a proxy column includes its upstream's share), a figure that other
jobs on the machine move less than req/s (they still raise it: fewer requests share each turn
of the event loop); "proxy CPU per request" is that minus the direct column's, per round;
"front ms/req" is the front process alone (the proxy; the mock for ``direct``). And
the machine's load average and the CPU used by processes that are not ours (``/proc/stat`` busy
time minus what our servers, hey and this script used), on core 0 and overall: other jobs on a
shared machine show there. Loopback kernel work charged to no process counts as "other" too, so
even a quiet machine shows a little.

Run:  .venv/bin/python benchmarks/gateway.py [--duration 10] [--rounds 3] [--quick] [--json]
          [--litellm /tmp/litellm-venv/bin/litellm] [--streams 2000] [--variants ...]

Set up LiteLLM once, outside the project's venv::

    python3 -m venv /tmp/litellm-venv
    /tmp/litellm-venv/bin/pip install 'litellm[proxy]' httptools

(``httptools`` so that LiteLLM's uvicorn parses HTTP with the same C parser as quotagate's and
the mock's, which get it from ``uvicorn[standard]``; the table says which parser it used.)
``--quick`` is a smoke run: 3 s per load, 1 round, 500 streams. ``--json`` prints the results as
JSON on stdout (the table then goes to stderr). Needs ``hey`` and ``taskset`` on PATH and two
cores. This folder holds ``http.py``, which shadows the stdlib ``http`` package for this script,
so it imports nothing that needs it (no httpx, no urllib): the client is raw asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
LITELLM_CONFIG = BENCH_DIR / "gateway_litellm_config.yaml"
WRK_SCRIPT = BENCH_DIR / "gateway_wrk.lua"
SERVER_CORE = 0
LOAD_CORE = 1
MODEL = "quotagate-mock"
PATH = "/v1/chat/completions"
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 16,
}
# quotagate's tier and LiteLLM's per-key limits: far above anything a run can reach.
TIER_REQUESTS = "10000000/minute"
TIER_TOKENS = "1000000000/minute"
TIER_CONCURRENCY = 1000
BACKEND_MAX_CONCURRENCY = 1000
HEY_LOADS: dict[str, int] = {"c10": 10, "c50": 50}  # load name -> connections
STREAM_LOAD = "ttft"
STREAM_CONCURRENCY = 10
LOADS = (*HEY_LOADS, STREAM_LOAD)
VARIANTS = ("direct", "quotagate", "litellm")
WARMUP_SECONDS = 1
WARMUP_STREAMS = 100
STREAM_TIMEOUT = 60.0
TARGET_ADDED_P50_MS = 1.0
TARGET_SHARE = 0.60


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of ``GET path``, or None when nothing answers HTTP on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode())
            head = sock.recv(64)
    except OSError:
        return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without anything that would change a server's setup behind our back."""
    dropped = ("QUOTAGATE_", "LITELLM_", "GATEWAY_BENCH_", "REDIS_", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra or {})
    return env


@dataclass
class Server:
    """A server child process on a free loopback port, pinned to the server core.

    ``command`` builds the argv for a port. Started in its own session, so that stopping it (by
    its pid, TERM then KILL) also stops anything it spawned, and nothing else.
    """

    name: str
    command: Callable[[int], list[str]]
    ready_path: str
    log: Path
    cwd: Path
    env: dict[str, str]
    startup_timeout: float = 30.0
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start and wait until it answers HTTP; a port taken meanwhile is retried once more."""
        for _ in range(3):
            self.port = free_port()
            argv = ["taskset", "-c", str(SERVER_CORE), *self.command(self.port)]
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                )
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log_tail(5).lower():
                break
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail(15)}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if http_status(self.port, self.ready_path) is not None:
                return True
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def log_tail(self, lines: int) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


# --- CPU accounting ----------------------------------------------------------------------------


def _busy() -> tuple[float, float]:
    """Busy CPU seconds so far (all cores, the server core): every state but idle and iowait."""
    tick = os.sysconf("SC_CLK_TCK")
    busy: dict[str, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in ("cpu", f"cpu{SERVER_CORE}"):
            values = [int(x) for x in fields[:8]]
            busy[name] = (sum(values) - values[3] - values[4]) / tick
    return busy["cpu"], busy[f"cpu{SERVER_CORE}"]


def _process_cpu(pid: int | None) -> float:
    """utime + stime of a process in seconds (0 once it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy_all: float
    busy_core: float
    ours: float  # this script and its finished children (hey)
    servers: float
    servers_core: float  # those of them pinned to the server core


def cpu_sample(servers: Sequence[Server], on_core: Sequence[Server]) -> CpuSample:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_all, busy_core = _busy()
    return CpuSample(
        wall=time.monotonic(),
        busy_all=busy_all,
        busy_core=busy_core,
        ours=own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        servers=sum(_process_cpu(server.pid) for server in servers),
        servers_core=sum(_process_cpu(server.pid) for server in on_core),
    )


def foreign_cpu(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Cores used during a measurement by our servers, and by processes that are not ours."""
    wall = max(after.wall - before.wall, 1e-9)
    servers = after.servers - before.servers
    ours = servers + after.ours - before.ours
    return {
        "server_cores": round(servers / wall, 3),
        "other_core0": round(
            max(
                0.0, after.busy_core - before.busy_core - (after.servers_core - before.servers_core)
            )
            / wall,
            3,
        ),
        "other_all": round(max(0.0, after.busy_all - before.busy_all - ours) / wall, 3),
    }


# --- the loads ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One load against one column: throughput, two latency percentiles, what came back."""

    rps: float
    p50_ms: float | None
    p99_ms: float | None
    count: int
    statuses: dict[str, int]
    errors: dict[str, int]
    samples: dict[str, str] = field(default_factory=dict)  # status -> start of a body

    @property
    def bad(self) -> int:
        """Requests that did not end in a 2xx (non-2xx statuses plus transport errors)."""
        non_2xx = sum(n for s, n in self.statuses.items() if not s.startswith("2"))
        return non_2xx + sum(self.errors.values())


def run_hey(port: int, key: str, connections: int, duration: float) -> Result:
    """``hey -z`` on the load core; raises when hey fails or prints no summary."""
    argv = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "hey",
        "-z",
        f"{duration:g}s",
        "-c",
        str(connections),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {key}",
        "-d",
        json.dumps(REQUEST),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    return parse_hey(done.stdout, done.stderr, done.returncode)


def run_wrk(port: int, key: str, connections: int, duration: float) -> Result:
    """``wrk`` (one thread, static request) on the load core; raises when it prints no summary."""
    argv = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "-s",
        str(WRK_SCRIPT),
        f"http://127.0.0.1:{port}{PATH}",
        "--",
        key,
        json.dumps(REQUEST),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    return parse_wrk(done.stdout, done.stderr, done.returncode)


def parse_wrk(out: str, err: str = "", returncode: int = 0) -> Result:
    line = next((x for x in out.splitlines() if x.startswith("GATEWAYBENCH ")), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {returncode}): {(err or out).strip()[:500]}")
    values = {k: int(v) for k, v in (pair.split("=", 1) for pair in line.split()[1:])}
    non2xx = values["non2xx"]
    statuses = {"2xx": values["requests"] - non2xx}
    if non2xx:
        statuses["non-2xx"] = non2xx
    errors = {
        f"socket {kind} errors": values[f"errors_{kind}"]
        for kind in ("connect", "read", "write", "timeout")
        if values[f"errors_{kind}"]
    }
    seconds = values["duration_us"] / 1e6
    return Result(
        rps=values["requests"] / seconds if seconds else 0.0,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        count=values["requests"],
        statuses=statuses,
        errors=errors,
    )


def run_http_load(
    args: argparse.Namespace, port: int, key: str, connections: int, duration: float
) -> Result:
    run = run_wrk if args.loadgen == "wrk" else run_hey
    return run(port, key, connections, duration)


def parse_hey(out: str, err: str = "", returncode: int = 0) -> Result:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if returncode != 0 or rps is None:
        raise RuntimeError(f"hey failed (exit {returncode}): {(err or out).strip()[:500]}")
    head, _, error_part = out.partition("Error distribution:")
    statuses = {
        code: int(n) for code, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", head, re.M)
    }
    errors: dict[str, int] = {}
    for n, message in re.findall(r"^\s*\[(\d+)\]\s+(.+)$", error_part, re.M):
        errors[message.strip()] = errors.get(message.strip(), 0) + int(n)

    def percentile(p: int) -> float | None:
        match = re.search(rf"^\s*{p}% in ([\d.]+) secs", head, re.M)
        return float(match.group(1)) * 1000 if match else None

    return Result(
        rps=float(rps.group(1)),
        p50_ms=percentile(50),
        p99_ms=percentile(99),
        count=sum(statuses.values()),
        statuses=statuses,
        errors=errors,
    )


def percentile_of(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of the values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def render_request(port: int, key: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body as it arrives: chunked, by Content-Length, or until the connection closes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length:
            yield await reader.readexactly(length)
    else:
        yield await reader.read()


def has_content(event: bytes) -> bool:
    """Whether an SSE event carries generated text (a non-empty ``delta.content``)."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            continue
        choices = payload.get("choices") if isinstance(payload, dict) else None
        for choice in choices or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and delta.get("content"):
                return True
    return False


@dataclass
class _StreamRun:
    remaining: int
    ttft: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)


async def _one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, run: _StreamRun
) -> bool:
    """One streamed request on an open connection; returns whether the connection stays open."""
    started = time.perf_counter()
    writer.write(request)
    status, headers = await read_head(reader)
    first: float | None = None
    buffer = b""
    tail = b""
    body = b""
    async for chunk in iter_body(reader, headers):
        if status != 200:
            body += chunk
            continue
        if first is None:
            buffer += chunk.replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            if any(has_content(event) for event in events):
                first = time.perf_counter() - started
        tail = (tail + chunk)[-64:]
    run.statuses[str(status)] += 1
    if status != 200:
        run.samples.setdefault(str(status), body[:300].decode("utf-8", "replace"))
    elif first is None:
        run.errors["200 without a content chunk"] += 1
    elif b"[DONE]" not in tail:
        run.errors["stream did not end in data: [DONE]"] += 1
    else:
        run.ttft.append(first)
    return headers.get("connection", "").lower() != "close"


async def _stream_worker(port: int, request: bytes, run: _StreamRun) -> None:
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while run.remaining > 0:
            run.remaining -= 1
            try:
                if connection is None:
                    connection = await asyncio.open_connection("127.0.0.1", port)
                reader, writer = connection
                async with asyncio.timeout(STREAM_TIMEOUT):
                    keep = await _one_stream(reader, writer, request, run)
            except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
                run.errors[f"{type(e).__name__}: {e}"[:120]] += 1
                keep = False
            if not keep and connection is not None:
                connection[1].close()
                connection = None
    finally:
        if connection is not None:
            connection[1].close()


async def _run_streams(port: int, key: str, count: int, concurrency: int) -> tuple[Result, float]:
    request = render_request(port, key, {**REQUEST, "stream": True})
    run = _StreamRun(remaining=count)
    started = time.perf_counter()
    await asyncio.gather(*(_stream_worker(port, request, run) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    p50, p99 = percentile_of(run.ttft, 50), percentile_of(run.ttft, 99)
    result = Result(
        rps=count / elapsed,
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
        count=sum(run.statuses.values()),
        statuses=dict(run.statuses),
        errors=dict(run.errors),
        samples=run.samples,
    )
    return result, elapsed


def run_streams(port: int, key: str, count: int, concurrency: int = STREAM_CONCURRENCY) -> Result:
    """``count`` streamed chat completions over ``concurrency`` keep-alive connections."""
    return asyncio.run(_run_streams(port, key, count, concurrency))[0]


def one_request(port: int, key: str) -> tuple[int, str]:
    """One non-streamed chat completion: its status and body (a start-up check)."""

    async def go() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(30):
                writer.write(render_request(port, key, REQUEST))
                status, headers = await read_head(reader)
                body = b"".join([chunk async for chunk in iter_body(reader, headers)])
        finally:
            writer.close()
        return status, body.decode("utf-8", "replace")

    return asyncio.run(go())


# --- the columns -------------------------------------------------------------------------------


def mock_argv(port: int) -> list[str]:
    argv = [sys.executable, "-m", "quotagate", "mock", "--port", str(port)]
    return [*argv, "--tokens-per-second", "0"]


def quotagate_argv(config: Path, port: int) -> list[str]:
    argv = [sys.executable, "-m", "quotagate", "serve", "--config", str(config)]
    return [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def litellm_argv(command: list[str], port: int) -> list[str]:
    return [*command, "--config", str(LITELLM_CONFIG), "--host", "127.0.0.1", "--port", str(port)]


def quotagate_config(upstream_port: int, key: str) -> str:
    return f"""\
log_level = "warning"

[server]
host = "127.0.0.1"

[storage]
url = "memory://"

[backend]
kind = "openai"
url = "http://127.0.0.1:{upstream_port}/v1"
max_concurrency = {BACKEND_MAX_CONCURRENCY}
queue_timeout_ms = 30000

[health]
requests = "{TIER_REQUESTS}"

[tiers.bench]
requests = "{TIER_REQUESTS}"
tokens = "{TIER_TOKENS}"
concurrency = {TIER_CONCURRENCY}

[[keys]]
key = "{key}"
tier = "bench"
name = "bench"
"""


def litellm_command(path: str) -> tuple[list[str], Path | None]:
    """How to run the proxy from ``--litellm`` (its CLI or its venv's python), and that python."""
    given = Path(path)
    if given.name.startswith("python"):
        return [str(given), "-m", "litellm.proxy.proxy_cli"], given
    sibling = given.parent / "python"
    return [str(given)], sibling if sibling.exists() else None


def litellm_problem(path: str | None) -> str | None:
    """Why the LiteLLM column cannot run, or None."""
    if path is None:
        return (
            "LiteLLM column skipped: no --litellm given. Install it in its own venv "
            "(python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install "
            "'litellm[proxy]' httptools) and pass --litellm /tmp/litellm-venv/bin/litellm."
        )
    given = Path(path)
    if not given.is_file() or not os.access(given, os.X_OK):
        return f"LiteLLM column skipped: --litellm {path} is not an executable file."
    return None


def python_facts(python: Path | None) -> dict[str, str | None]:
    """LiteLLM's version and which HTTP parser its uvicorn picks, asked from its own python."""
    if python is None:
        return {"version": None, "http": None}
    code = (
        "import importlib.metadata as m, importlib.util as u\n"
        "print(m.version('litellm'))\n"
        "print('httptools' if u.find_spec('httptools') else 'h11')\n"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return {"version": None, "http": None}
    return {"version": out[0] if out else None, "http": out[1] if len(out) > 1 else None}


@dataclass
class Column:
    name: str
    port: int
    servers: list[Server]  # every process this column's requests go through


# --- summaries ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    round: int
    load: str
    variant: str
    result: Result
    cpu: dict[str, float]
    loadavg: tuple[float, float, float]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _figure(m: Measurement, metric: str) -> float | None:
    value = m.cpu[metric] if metric.endswith("ms_per_req") else getattr(m.result, metric)
    return None if value is None else float(value)


def summarize(measurements: Sequence[Measurement]) -> dict[str, Any]:
    """Medians per column and load; paired ratios and differences per round, then medians."""
    by: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        by.setdefault((m.variant, m.load), []).append(m)
    medians: dict[str, dict[str, Any]] = {}
    for (variant, load), ms in by.items():
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        samples: dict[str, str] = {}
        for m in ms:
            statuses.update(m.result.statuses)
            errors.update(m.result.errors)
            for status, sample in m.result.samples.items():
                samples.setdefault(status, sample)
        medians.setdefault(variant, {})[load] = {
            "rps": _median([m.result.rps for m in ms]),
            "p50_ms": _median([m.result.p50_ms for m in ms]),
            "p99_ms": _median([m.result.p99_ms for m in ms]),
            "requests": sum(m.result.count for m in ms),
            "statuses": dict(statuses),
            "errors": dict(errors),
            "samples": samples,
            "other_core0": _median([m.cpu["other_core0"] for m in ms]),
            "other_all": _median([m.cpu["other_all"] for m in ms]),
            "cpu_ms_per_req": _median([m.cpu["cpu_ms_per_req"] for m in ms]),
            "front_ms_per_req": _median([m.cpu.get("front_ms_per_req") for m in ms]),
            "rounds": len(ms),
        }

    def paired(
        a: str, b: str, load: str, metric: str, how: Callable[[float, float], float]
    ) -> float | None:
        """Median over rounds of how(a's figure, b's figure), rounds where both ran."""
        values = []
        for r in sorted({m.round for m in measurements}):
            x = next((m for m in by.get((a, load), []) if m.round == r), None)
            y = next((m for m in by.get((b, load), []) if m.round == r), None)
            if x is None or y is None:
                continue
            xv, yv = _figure(x, metric), _figure(y, metric)
            if xv is not None and yv is not None and yv != 0:
                values.append(how(xv, yv))
        return statistics.median(values) if values else None

    ratios: dict[str, Any] = {"added_ms": {}, "share": {}, "vs_litellm": {}, "proxy_cpu_ms": {}}
    for load in LOADS:
        for proxy in ("quotagate", "litellm"):
            ratios["proxy_cpu_ms"][f"{proxy}_{load}"] = paired(
                proxy, "direct", load, "cpu_ms_per_req", lambda p, d: p - d
            )
        for metric in ("p50_ms", "p99_ms"):
            ratios["added_ms"][f"{load}_{metric[:3]}"] = paired(
                "quotagate", "direct", load, metric, lambda q, d: q - d
            )
        ratios["share"][load] = paired("quotagate", "direct", load, "rps", lambda q, d: q / d)
        for metric in ("rps", "p50_ms", "p99_ms"):
            if metric == "rps":
                factor = paired("quotagate", "litellm", load, metric, lambda q, lt: q / lt)
            else:
                factor = paired("litellm", "quotagate", load, metric, lambda lt, q: lt / q)
            ratios["vs_litellm"][f"{load}_{metric.removesuffix('_ms')}"] = factor

    added = ratios["added_ms"].get("c10_p50")
    shares = [ratios["share"][load] for load in HEY_LOADS]
    versus = [v for v in ratios["vs_litellm"].values() if v is not None]
    targets = {
        "added_p50_c10_under_1ms": None if added is None else added < TARGET_ADDED_P50_MS,
        "share_at_least_60pct": None
        if any(s is None for s in shares)
        else all(s >= TARGET_SHARE for s in shares),
        "beats_litellm_on_every_figure": None
        if not versus or len(versus) < len(ratios["vs_litellm"])
        else all(v > 1 for v in versus),
    }
    return {"medians": medians, "ratios": ratios, "targets": targets}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _statuses_text(entry: dict[str, Any]) -> str:
    parts = [f"{code}:{n}" for code, n in sorted(entry["statuses"].items())]
    parts += [f"err:{n}" for n in entry["errors"].values()]
    return " ".join(parts) or "none"


def render_table(report: dict[str, Any]) -> str:
    setup, summary = report["setup"], report["summary"]
    medians, ratios, targets = summary["medians"], summary["ratios"], summary["targets"]
    variants = [v for v in VARIANTS if v in medians]
    lines = [
        f"quotagate gateway benchmark · {setup['rounds']} round(s) x {setup['duration']:g} s "
        f"per {setup.get('loadgen', 'hey')} load · {setup['streams']} streams at "
        f"{STREAM_CONCURRENCY} connections · "
        + (
            f"layout split: each proxy alone on core {SERVER_CORE}; the upstream (alone on core "
            f"{SERVER_CORE} for direct) with {setup.get('loadgen', 'hey')} and the stream client "
            f"on core {LOAD_CORE}"
            if setup.get("layout", "shared") == "split"
            else f"layout shared: servers on core {SERVER_CORE}, {setup.get('loadgen', 'hey')} and "
            "the stream client on "
            f"core {LOAD_CORE}"
        ),
        f"upstream: quotagate mock (tokens/s 0) · quotagate {setup['quotagate_version']} · "
        f"LiteLLM {setup['litellm'].get('version') or '-'} "
        f"({setup['litellm'].get('note') or 'not run'})",
        f"load average: start {setup['loadavg_start']} · end {report['loadavg_end']}",
        "",
    ]
    width = 14
    header = f"{'':<16}" + "".join(f"{v:>{width}}" for v in variants)
    lines.append(header)
    rows = [
        ("c10", "rps", "req/s", 0),
        ("c10", "p50_ms", "p50 ms", 2),
        ("c10", "p99_ms", "p99 ms", 2),
        ("c50", "rps", "req/s", 0),
        ("c50", "p50_ms", "p50 ms", 2),
        ("c50", "p99_ms", "p99 ms", 2),
        (STREAM_LOAD, "p50_ms", "TTFT p50 ms", 2),
        (STREAM_LOAD, "p99_ms", "TTFT p99 ms", 2),
        (STREAM_LOAD, "rps", "streams/s", 0),
        ("c10", "cpu_ms_per_req", "CPU ms/req", 3),
        ("c50", "cpu_ms_per_req", "CPU ms/req", 3),
        (STREAM_LOAD, "cpu_ms_per_req", "CPU ms/stream", 3),
        ("c10", "front_ms_per_req", "front ms/req", 3),
        ("c50", "front_ms_per_req", "front ms/req", 3),
        (STREAM_LOAD, "front_ms_per_req", "front ms/strm", 3),
    ]
    for load, metric, label, digits in rows:
        name = f"{load} {label}" if load != STREAM_LOAD else label
        cells = [_fmt(medians[v].get(load, {}).get(metric), digits) for v in variants]
        lines.append(f"{name:<16}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("")
    lines.append("statuses (all rounds; err = no HTTP answer):")
    for load in LOADS:
        for v in variants:
            entry = medians[v].get(load)
            if entry is None:
                continue
            lines.append(f"  {load:<5} {v:<10} {_statuses_text(entry)}")
            for message, n in entry["errors"].items():
                lines.append(f"        error x{n}: {message}")
            for status, sample in entry["samples"].items():
                lines.append(f"        {status} body: {sample[:200]}")
    lines.append("")
    lines.append("other processes' CPU during the loads (median, cores; core 0 = the servers'):")
    for v in variants:
        cells = [
            f"{load} {_fmt(medians[v][load]['other_core0'])}/{_fmt(medians[v][load]['other_all'])}"
            for load in LOADS
            if load in medians[v]
        ]
        lines.append(f"  {v:<10} " + " · ".join(cells) + "   (core 0 / all)")
    lines.append("")
    added = ratios["added_ms"]
    lines.append(
        "quotagate added latency (quotagate - direct, median of per-round differences, ms): "
        f"c10 p50 {_fmt(added['c10_p50'])}, p99 {_fmt(added['c10_p99'])} · "
        f"c50 p50 {_fmt(added['c50_p50'])}, p99 {_fmt(added['c50_p99'])} · "
        f"TTFT p50 {_fmt(added['ttft_p50'])}, p99 {_fmt(added['ttft_p99'])}"
    )
    share = ratios["share"]
    lines.append(
        "quotagate req/s as a share of direct: "
        + " · ".join(
            f"{load} " + ("-" if share[load] is None else f"{share[load]:.0%}") for load in LOADS
        )
    )
    cpu = ratios["proxy_cpu_ms"]
    proxies = [p for p in ("quotagate", "litellm") if cpu[f"{p}_{LOADS[0]}"] is not None]
    if proxies:
        lines.append(
            "proxy CPU per request (column's servers - direct's, ms; less moved by other "
            "jobs than req/s): "
            + " · ".join(
                f"{proxy} "
                + " ".join(f"{load} {_fmt(cpu[f'{proxy}_{load}'], 3)}" for load in LOADS)
                for proxy in proxies
            )
        )
    versus = ratios["vs_litellm"]
    if any(v is not None for v in versus.values()):
        lines.append(
            "quotagate vs LiteLLM (x better: req/s quotagate/litellm, latency litellm/quotagate):"
        )
        for load in LOADS:
            lines.append(
                f"  {load:<5} "
                + " · ".join(
                    f"{metric} x{_fmt(versus[f'{load}_{metric}'])}"
                    for metric in ("rps", "p50", "p99")
                )
            )
    lines.append("")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    lines.append(
        f"targets: added p50 at c10 < {TARGET_ADDED_P50_MS:g} ms: "
        f"{verdict(targets['added_p50_c10_under_1ms'])} · req/s ≥ {TARGET_SHARE:.0%} of direct "
        f"(c10 and c50): {verdict(targets['share_at_least_60pct'])} · beats LiteLLM on every "
        f"figure: {verdict(targets['beats_litellm_on_every_figure'])}"
    )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks stop every server."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure(
    column: Column,
    load: str,
    key: str,
    args: argparse.Namespace,
    all_servers: Sequence[Server],
) -> tuple[Result, dict[str, float]]:
    upstream = column.servers[0]
    on_core = list(all_servers)
    if args.layout == "split":
        # The model server runs on a host of its own in production: give the proxy the
        # server core to itself and put the upstream with the load generator.
        core = SERVER_CORE if column.name == "direct" else LOAD_CORE
        pin(upstream, core)
        if core != SERVER_CORE:
            on_core.remove(upstream)
    before = cpu_sample(all_servers, on_core)
    own_before = sum(_process_cpu(server.pid) for server in column.servers)
    proxy_before = _process_cpu(column.servers[-1].pid)
    if load == STREAM_LOAD:
        result = run_streams(column.port, key, args.streams)
    else:
        result = run_http_load(args, column.port, key, HEY_LOADS[load], args.duration)
    own = sum(_process_cpu(server.pid) for server in column.servers) - own_before
    proxy = _process_cpu(column.servers[-1].pid) - proxy_before
    cpu = foreign_cpu(before, cpu_sample(all_servers, on_core))
    # CPU the column's own servers spent per answered request: less moved than req/s by other
    # jobs on the machine (a proxy column includes the upstream's share).
    cpu["cpu_ms_per_req"] = round(own * 1000 / result.count, 3) if result.count else 0.0
    # The proxy process alone (the upstream itself for the direct column).
    cpu["front_ms_per_req"] = round(proxy * 1000 / result.count, 3) if result.count else 0.0
    return result, cpu


def pin(server: Server, core: int) -> None:
    """Move every thread of a running server to ``core``."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(core), str(server.pid)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def log(message: str, out: TextIO) -> None:
    print(message, file=out, flush=True)


def run(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    key = "sk-bench-" + secrets.token_hex(12)
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    servers: list[Server] = []
    columns: dict[str, Column] = {}
    wanted = [v for v in VARIANTS if v in args.variants]
    litellm: dict[str, Any] = {"path": args.litellm}
    measurements: list[Measurement] = []
    try:
        env = child_env()
        mock = Server(
            "mock",
            mock_argv,
            "/v1/models",
            workdir / "mock.log",
            workdir,
            env,
        )
        servers.append(mock)
        mock.start()
        log(f"mock upstream: pid {mock.pid}, port {mock.port}", out)
        if "direct" in wanted:
            columns["direct"] = Column("direct", mock.port, [mock])

        if "quotagate" in wanted:
            config = workdir / "quotagate.toml"
            config.write_text(quotagate_config(mock.port, key))
            gateway = Server(
                "quotagate",
                functools.partial(quotagate_argv, config),
                "/health",
                workdir / "quotagate.log",
                workdir,
                env,
            )
            servers.append(gateway)
            gateway.start()
            log(f"quotagate gateway: pid {gateway.pid}, port {gateway.port}", out)
            columns["quotagate"] = Column("quotagate", gateway.port, [mock, gateway])

        if "litellm" in wanted:
            problem = litellm_problem(args.litellm)
            if problem is None:
                command, python = litellm_command(args.litellm)
                litellm.update(python_facts(python))
                litellm["note"] = (
                    "per-key rpm_limit/tpm_limit/max_parallel_requests via custom_auth, "
                    f"in memory, uvicorn http={litellm.get('http') or '?'}"
                )
                proxy = Server(
                    "litellm",
                    functools.partial(litellm_argv, command),
                    "/health/liveliness",
                    workdir / "litellm.log",
                    workdir,
                    child_env(
                        {
                            "GATEWAY_BENCH_UPSTREAM": f"http://127.0.0.1:{mock.port}/v1",
                            "GATEWAY_BENCH_LITELLM_MASTER_KEY": "sk-master-"
                            + secrets.token_hex(24),
                            "GATEWAY_BENCH_KEY": key,
                            "GATEWAY_BENCH_RPM": TIER_REQUESTS.split("/")[0],
                            "GATEWAY_BENCH_TPM": TIER_TOKENS.split("/")[0],
                            "GATEWAY_BENCH_PARALLEL": str(TIER_CONCURRENCY),
                            "LITELLM_LOG": "ERROR",
                            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                        }
                    ),
                    startup_timeout=120.0,
                )
                servers.append(proxy)
                try:
                    proxy.start()
                    log(f"litellm proxy: pid {proxy.pid}, port {proxy.port}", out)
                    columns["litellm"] = Column("litellm", proxy.port, [mock, proxy])
                except RuntimeError as exc:
                    problem = f"LiteLLM column skipped: the proxy did not start: {exc}"
                    proxy.stop()
            if problem is not None:
                log(problem, out)
                notes.append(problem)
                litellm["skipped"] = problem

        # Every column must answer a normal and a streamed request before it is measured.
        for name, column in list(columns.items()):
            status, body = one_request(column.port, key)
            streamed = run_streams(column.port, key, 3, 1)
            if status != 200 or streamed.statuses != {"200": 3} or streamed.errors:
                problem = (
                    f"{name} failed its start-up check: POST {PATH} answered {status} "
                    f"{body[:300]!r}; 3 streams: {streamed.statuses} {streamed.errors} "
                    f"{streamed.samples}"
                )
                if name != "litellm":
                    raise RuntimeError(problem)
                log(problem, out)
                notes.append(problem)
                litellm["skipped"] = problem
                del columns[name]

        for name, column in columns.items():  # warm-up, not measured
            warm = run_http_load(args, column.port, key, 50, WARMUP_SECONDS)
            warm_streams = run_streams(column.port, key, WARMUP_STREAMS)
            if warm.bad or warm_streams.bad:
                notes.append(
                    f"{name} warm-up: {args.loadgen} {warm.statuses} {warm.errors}; "
                    f"streams {warm_streams.statuses} {warm_streams.errors}"
                )

        order = [v for v in VARIANTS if v in columns]
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            log(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})", out)
            for load in LOADS:
                for name in rotated:
                    column = columns[name]
                    if not all(server.alive() for server in column.servers):
                        dead = [s.name for s in column.servers if not s.alive()]
                        raise RuntimeError(
                            f"{name}: {dead} exited: {column.servers[-1].log_tail(10)}"
                        )
                    result, cpu = measure(column, load, key, args, servers)
                    loadavg = os.getloadavg()
                    measurements.append(Measurement(r + 1, load, name, result, cpu, loadavg))
                    log(
                        f"  {load:<5} {name:<10} {result.rps:>9,.0f}/s  p50 "
                        f"{_fmt(result.p50_ms)} ms  p99 {_fmt(result.p99_ms)} ms  "
                        f"{_statuses_text({'statuses': result.statuses, 'errors': result.errors})}"
                        f"  cpu {cpu['cpu_ms_per_req']:.3f} ms/req"
                        f"  other cores {cpu['other_core0']:.2f}/{cpu['other_all']:.2f}"
                        f"  load {loadavg[0]:.2f}",
                        out,
                    )
    finally:
        for server in reversed(servers):
            server.stop()
        logs = {server.name: server.log_tail(20) for server in servers}
        shutil.rmtree(workdir, ignore_errors=True)

    errors_seen = [
        f"{m.variant} {m.load} round {m.round}: {m.result.statuses} {m.result.errors}"
        for m in measurements
        if m.result.bad
    ]
    notes += [f"non-2xx or errors: {e}" for e in errors_seen]
    return {
        "setup": {
            "duration": args.duration,
            "rounds": args.rounds,
            "layout": args.layout,
            "loadgen": args.loadgen,
            "streams": args.streams,
            "stream_concurrency": STREAM_CONCURRENCY,
            "request": REQUEST,
            "quotagate_version": _version("quotagate"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "litellm": litellm,
            "loadavg_start": args.loadavg_start,
            "quotagate_tier": {
                "requests": TIER_REQUESTS,
                "tokens": TIER_TOKENS,
                "concurrency": TIER_CONCURRENCY,
                "backend_max_concurrency": BACKEND_MAX_CONCURRENCY,
            },
        },
        "measurements": [{**asdict(m), "result": asdict(m.result)} for m in measurements],
        "summary": summarize(measurements),
        "loadavg_end": tuple(round(x, 2) for x in os.getloadavg()),
        "notes": notes,
        "server_logs": logs,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="quotagate gateway vs direct vs LiteLLM proxy, in front of the mock model."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per c10/c50 load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2000, help="streamed requests per TTFT")
    parser.add_argument("--quick", action="store_true", help="3 s, 1 round, 500 streams")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--loadgen",
        choices=("wrk", "hey"),
        default="wrk",
        help="the c10/c50 load generator: wrk (C, static request: leaves the load core to the "
        "upstream in the split layout) or hey",
    )
    parser.add_argument(
        "--layout",
        choices=("split", "shared"),
        default="split",
        help="split: a proxy has core 0 to itself, its upstream runs on core 1 with the load; "
        "shared: proxies and upstream all on core 0",
    )
    parser.add_argument(
        "--litellm",
        metavar="PATH",
        help="LiteLLM's `litellm` command or its venv's python (column skipped without it)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.streams = 3.0, 1, 500
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; expected {list(VARIANTS)}")
    if args.rounds < 1 or args.duration <= 0 or args.streams < 1:
        parser.error("--rounds, --duration and --streams must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (args.loadgen, "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("needs at least two cores (servers on core 0, load on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CORE})  # this script is the stream client: the load core
    args.loadavg_start = tuple(round(x, 2) for x in os.getloadavg())
    out = sys.stderr if args.json else sys.stdout
    try:
        with terminate_as_interrupt():
            report = run(args, out)
    except RuntimeError as exc:
        print(f"gateway benchmark failed: {exc}", file=sys.stderr)
        return 1
    log("", out)
    log(render_table(report), out)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

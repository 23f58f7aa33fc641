"""What the quotagate gateway costs in front of a model server, and how it compares to LiteLLM.

One run measures up to six columns against quotagate's mock model served alone (``python -m
quotagate mock --port P --tokens-per-second 0``: an OpenAI-compatible server that answers at
once): every column but fleet against the same one, fleet against four more of it:

    direct     the upstream itself
    quotagate  ``python -m quotagate serve --config FILE --port P2``: ``[backend] kind = "openai"``
               at ``http://127.0.0.1:P/v1``, ``memory://`` storage, one key in a tier with limits
               no run comes near: requests "10000000/minute", tokens "1000000000/minute",
               concurrency 1000; ``[backend] max_concurrency = 1000`` (above every load's
               connections), ``--log-level warning`` (no access log)
    fleet      the same gateway, storage, tier, key and limits as quotagate, with a fleet
               (issue 13) in place of ``[backend]``: two ``[[backends]]``, ``big`` with
               ``models = ["quotagate-mock"]`` and ``small`` with ``models =
               ["quotagate-mock-small"]``, each ``kind = "openai"`` with ``urls`` = two
               replicas: four more standalone mocks (``python -m quotagate mock --port Pn
               --tokens-per-second 0 --model NAME``, NAME its backend's one model), on the single
               mock's core; ``max_concurrency = 1000`` per replica (no load queues),
               ``queue_timeout_ms = 30000``, ``health_interval_s = 5`` (the default: every
               replica probed with ``GET /v1/models`` each 5 s, as in production; those 4
               probes per 5 s also run while other columns are measured). The load is the same
               request as every column's (model ``quotagate-mock``): all of it goes to ``big``,
               spread over its two replicas (least in flight, ties in turn); ``small`` answers
               one completion of the start-up check and nothing else, so that both columns
               proxy the same requests and differ only by the fleet. Its mock CPU is big's two
               replicas summed
    baseline   the same as quotagate, served by another checkout's quotagate
               (``--baseline-python PATH``: that checkout's venv python; the column is
               skipped without it): a before/after comparison interleaved in one run
    floor      ``benchmarks/gateway_floor.py`` under the same uvicorn (httptools, uvloop): a bare
               ASGI app that reads the body, sends it upstream on quotagate's HTTP/1.1 pool and
               answers with what came back; no identity, parsing, limits, headers or metrics.
               The least any proxy on this stack can spend: quotagate's own work is what it
               spends above this
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

Loads: every one from wrk (C, one thread, one request rendered once: the lightest load
generator there is, which matters because it shares its core with the model server), against
every column, loopback, keep-alive, ``--duration`` s each:

    completion  ``POST URL/v1/chat/completions`` with ``Authorization: Bearer KEY`` and
                ``{"model": "quotagate-mock", "messages": [{"role": "user", "content":
                "Hello"}], "max_tokens": 16}`` (``benchmarks/gateway_wrk.lua``)
    stream      the same body with ``"stream": true``: the mock answers 19 SSE events (the role,
                16 words, the finish reason, ``[DONE]``). wrk counts a request when the whole
                answer has arrived (the chunked body's last chunk), so one stream is one
                request and its latency the whole stream's
    c1          one connection: unsaturated, so p50 / p99 are latency. The added latency is
                taken here (quotagate p50 - direct p50, p99 likewise, per round)
    c10, c50    10 / 50 connections: saturated, so req/s is the figure (a p50 there is
                connections / req/s, a throughput figure in disguise, and is not reported as
                added latency)

Before any measurement every column answers one completion and one stream (read by this
script), then ``benchmarks/gateway_wrk_check.lua`` runs each kind for 1 s at one connection
with a ``response()`` function that sees every answer's body: every answer a 2xx, as many SSE
events per stream as the mock itself sends, every stream ending in ``data: [DONE]``, and wrk's
bytes per counted request. Every measured run's bytes per request is then compared with that
check's (a stream counted before its end would show fewer bytes). The fleet's check also asks
each replica's ``GET /stats`` (``{"completions": n}``, what it received): both replicas of
``big`` must have received some of the wrk check's requests, and one completion for
``quotagate-mock-small`` must be answered, by ``small``'s replicas alone. The same counts,
read before the first round and after the last, give what each replica received during the
measured fleet runs: printed at the end beside wrk's count, every replica of ``big`` above 0.

Method (``--layout``), with ``taskset``:

    split      (default) quotagate (or LiteLLM) alone on core 0; the mock model server (and
               the fleet's four), wrk and this script on core 1. ``direct`` uses the same
               layout (the mock on core 1 beside wrk, core 0 idle), so the columns differ only
               by the proxy. In production the model server is on a GPU host of its own and
               the gateway's CPU is the gateway's: this layout measures what the proxy itself
               costs. Its ceiling: core 1 carries the model server AND the load generator, so
               where they use all of it the proxied req/s is what core 1 allows, not what the
               proxy could carry; the table prints how much of core 1 they used.
    shared     the mocks and every proxy on core 0, wrk and this script on core 1: a proxy and
               its upstream fight for one core (every proxied request costs the upstream's work
               plus the proxy's on the same core).

CPU per request: every measurement reads utime + stime (``/proc/PID/stat``) of the proxy and of
the mock (for fleet: big's two replicas) before and after the run, and divides each delta by
the requests wrk completed: the gateway's own CPU per request beside the mock's CPU per request
for producing it (in the same run), and their ratio. wrk's CPU comes from this script's
``RUSAGE_CHILDREN``. Each core's use is reported twice: by our processes pinned to it (their
CPU / wall time) and in all (``/proc/stat`` busy time / wall time), so other jobs on a shared
machine show as the difference.

Servers start once, on free loopback ports, each waited for until it answers, checked, warmed
up (1 s of each kind at 50 connections) and stopped by pid at the end (TERM, then KILL;
try/finally). ``--rounds`` rounds (default 3) interleave the columns: every load runs on each
column in turn, in an order rotated every round, so that a slow spell on the machine hits all of
them. Figures are medians over rounds; ratios and differences are taken between columns of the
SAME round, then the median over rounds is reported:

    ratio        quotagate req/s / direct req/s
    +p50, +p99   quotagate - direct at one connection (ms)
    gw/mock      quotagate's CPU per request / the mock's, in the same run
    fleet/qg     fleet's CPU per request / quotagate's (and req/s likewise): what the fleet
                 costs the gateway over one backend, printed per load beside both CPU figures
    vs litellm   for every figure, how many times better quotagate is (req/s: quotagate /
                 litellm; latency and CPU per request: litellm / quotagate)

Targets (issue 11): the gateway's CPU per completion at most the mock's, per stream not above
the mock's, and not growing from 10 to 50 connections (within 5%); kept from before: under 1 ms
added at p50 (completion, one connection), at least 60% of the direct req/s (completion, 10 and
50 connections), and beating LiteLLM's proxy on every figure. Issue 13: the gateway's CPU per
completion with the fleet at most 10% above the single backend's (fleet/qg CPU <= 1.10,
completion, 10 and 50 connections), the fleet's load reaching every replica of ``big``.

Run:  .venv/bin/python benchmarks/gateway.py [--duration 10] [--rounds 3] [--quick] [--json]
          [--litellm /tmp/litellm-venv/bin/litellm] [--layout split|shared]
          [--variants direct,quotagate,fleet,litellm] [--connections 1,10,50]

Set up LiteLLM once, outside the project's venv::

    python3 -m venv /tmp/litellm-venv
    /tmp/litellm-venv/bin/pip install 'litellm[proxy]' httptools

(``httptools`` so that LiteLLM's uvicorn parses HTTP with the same C parser as quotagate's and
the mock's, which get it from ``uvicorn[standard]``; the table says which parser it used.)
``--quick`` is a smoke run: 2 s per load, 1 round (about 80 s without LiteLLM). ``--json``
prints the results as JSON on stdout (the table then goes to stderr). Needs ``wrk`` and
``taskset`` on PATH and two cores. This folder holds ``http.py``, which shadows the stdlib
``http`` package for this script, so it imports nothing that needs it (no httpx, no urllib):
its ports and processes come from ``quotagate.testing`` (standard library only), and the
start-up check's client is raw asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

from quotagate.testing import ServerProcess, core_busy, http_status, process_cpu

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
LITELLM_CONFIG = BENCH_DIR / "gateway_litellm_config.yaml"
WRK_SCRIPT = BENCH_DIR / "gateway_wrk.lua"
WRK_CHECK_SCRIPT = BENCH_DIR / "gateway_wrk_check.lua"
PROXY_CORE = 0
LOAD_CORE = 1
CORES = (PROXY_CORE, LOAD_CORE)
MODEL = "quotagate-mock"
PATH = "/v1/chat/completions"
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 16,
}
BODIES: dict[str, dict[str, Any]] = {  # load kind -> request body
    "completion": REQUEST,
    "stream": {**REQUEST, "stream": True},
}
KINDS = tuple(BODIES)
CONNECTIONS = (1, 10, 50)
LATENCY_CONNECTIONS = 1  # unsaturated: the one load whose p50 / p99 are latency
# quotagate's tier and LiteLLM's per-key limits: far above anything a run can reach.
TIER_REQUESTS = "10000000/minute"
TIER_TOKENS = "1000000000/minute"
TIER_CONCURRENCY = 1000
BACKEND_MAX_CONCURRENCY = 1000
# The fleet column: two [[backends]] of two replicas each; the load asks for MODEL (backend
# "big"), the other backend's model only in the start-up check.
FLEET_BACKENDS = {"big": MODEL, "small": "quotagate-mock-small"}  # backend name -> its model
FLEET_REPLICAS = 2
FLEET_HEALTH_INTERVAL_S = 5  # FleetBackendConfig's default: probing runs as in production
TARGET_FLEET_CPU = 1.10  # the fleet's CPU per completion at most this times the single backend's
VARIANTS = ("direct", "quotagate", "tenant", "fleet", "baseline", "floor", "litellm")
PROXIES = ("quotagate", "tenant", "fleet", "baseline", "floor", "litellm")
#: The tenant column's admin key: the load's key is issued through its admin API at start.
TENANT_ADMIN_KEY = "adm-bench-0123456789"
WARMUP_SECONDS = 1
WARMUP_CONNECTIONS = 50
CHECK_SECONDS = 1
WRK_TIMEOUT = "10s"  # above any answer's time at 50 connections: a slow spell is not an error
# A measured run's bytes per request below this share of its check's means requests were
# counted before their answer ended (a run's last, unfinished answers only add bytes).
BYTES_TOLERANCE = 0.98
TARGET_ADDED_P50_MS = 1.0
TARGET_SHARE = 0.60
TARGET_GROWTH = 1.05  # CPU per request at 50 connections at most this times that at 10


def load_name(kind: str, connections: int) -> str:
    return f"{kind} c{connections}"


# --- processes ---------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without anything that would change a server's setup behind our back."""
    dropped = ("QUOTAGATE_", "LITELLM_", "GATEWAY_BENCH_", "REDIS_", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra or {})
    return env


class Server(ServerProcess):
    """A server child process on a free loopback port, pinned to ``core`` (``taskset``; None:
    not pinned), in a session of its own (stopping it by its pid stops what it spawned, and
    nothing else), ready once ``ready_path`` answers HTTP."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        ready_path: str,
        core: int | None,
        log: Path,
        cwd: Path,
        env: dict[str, str],
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            [] if core is None else ["taskset", "-c", str(core)],
            name=name,
            env=env,
            cwd=cwd,
            log=log,
            startup_timeout=startup_timeout,
            port_retries=2,
            new_session=True,
            stop_timeout=15.0,
        )
        self.build = command
        self.ready_path = ready_path
        self.core = core

    def command(self) -> list[str]:
        return [*self.argv, *self.build(self.port)]

    def ready(self) -> bool:
        return http_status(self.port, self.ready_path) is not None

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far (0 once it is gone)."""
        return process_cpu(self.pid)

    def log_tail(self, lines: int) -> str:
        return "\n".join([line for line in self.output().splitlines() if line.strip()][-lines:])


@dataclass
class Column:
    name: str
    port: int
    proxy: Server | None  # None for direct
    mocks: tuple[Server, ...]  # the upstreams this column's load goes to (the fleet's "big")
    standby: tuple[Server, ...] = ()  # upstreams the proxy has that the load never asks for
    key: str | None = None  # its own API key (the tenant column's, issued by its admin API)

    @property
    def servers(self) -> list[Server]:
        """Every process this column depends on, the proxy last."""
        upstreams = [*self.mocks, *self.standby]
        return upstreams if self.proxy is None else [*upstreams, self.proxy]


# --- CPU accounting ----------------------------------------------------------------------------


def own_cpu() -> tuple[float, float]:
    """CPU seconds of this script, and of its finished children (every wrk run)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: dict[int, float]  # core -> busy seconds, every process
    servers: dict[str, float]  # server name -> CPU seconds
    script: float
    wrk: float


def cpu_sample(servers: Sequence[Server]) -> CpuSample:
    script, wrk = own_cpu()
    return CpuSample(
        wall=time.monotonic(),
        busy=core_busy(CORES),
        servers={server.name: server.cpu_seconds() for server in servers},
        script=script,
        wrk=wrk,
    )


def cpu_figures(
    before: CpuSample, after: CpuSample, servers: Sequence[Server], column: Column, requests: int
) -> dict[str, float | None]:
    """CPU per request of the proxy, the mock and wrk; each core's use (ours and in all)."""
    wall = max(after.wall - before.wall, 1e-9)
    spent = {name: after.servers[name] - before.servers[name] for name in after.servers}
    wrk = after.wrk - before.wrk
    script = after.script - before.script

    def per_request(seconds: float) -> float | None:
        return round(seconds * 1000 / requests, 4) if requests else None

    figures: dict[str, float | None] = {
        "proxy_ms": per_request(spent[column.proxy.name]) if column.proxy else None,
        "mock_ms": per_request(sum(spent[mock.name] for mock in column.mocks)),
        "wrk_ms": per_request(wrk),
    }
    for core in CORES:
        ours = sum(spent[s.name] for s in servers if s.core == core)
        if core == LOAD_CORE:  # wrk and this script run there
            ours += wrk + script
        figures[f"core{core}_ours"] = round(ours / wall, 3)
        figures[f"core{core}_busy"] = round((after.busy[core] - before.busy[core]) / wall, 3)
    return figures


# --- the loads ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One wrk load against one column: throughput, two latency percentiles, what came back."""

    rps: float
    p50_ms: float | None  # None when no request completed
    p99_ms: float | None
    count: int
    bytes_per_request: float | None
    statuses: dict[str, int]
    errors: dict[str, int]

    @property
    def bad(self) -> int:
        """Requests that did not end in a 2xx (non-2xx statuses plus socket errors)."""
        non_2xx = sum(n for s, n in self.statuses.items() if not s.startswith("2"))
        return non_2xx + sum(self.errors.values())


def wrk_argv(
    script: Path, port: int, key: str, kind: str, connections: int, seconds: float
) -> list[str]:
    """``wrk`` with one thread on the load core, the body of ``kind`` as the script's argument."""
    return [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
        "--",
        key,
        json.dumps(BODIES[kind]),
    ]


def summary_line(prefix: str, out: str, err: str, returncode: int) -> dict[str, int]:
    """The key=value pairs of the line the wrk script prints at the end; raises without it."""
    line = next((x for x in out.splitlines() if x.startswith(prefix + " ")), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {returncode}): {(err or out).strip()[:500]}")
    return {k: int(v) for k, v in (pair.split("=", 1) for pair in line.split()[1:])}


def run_wrk(port: int, key: str, kind: str, connections: int, seconds: float) -> Result:
    argv = wrk_argv(WRK_SCRIPT, port, key, kind, connections, seconds)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    return parse_wrk(done.stdout, done.stderr, done.returncode)


def parse_wrk(out: str, err: str = "", returncode: int = 0) -> Result:
    values = summary_line("GATEWAYBENCH", out, err, returncode)
    requests, non2xx = values["requests"], values["non2xx"]
    statuses = {"2xx": requests - non2xx}
    if non2xx:
        statuses["non-2xx"] = non2xx
    errors = {
        f"socket {kind} errors": values[f"errors_{kind}"]
        for kind in ("connect", "read", "write", "timeout")
        if values[f"errors_{kind}"]
    }
    seconds = values["duration_us"] / 1e6
    return Result(
        rps=requests / seconds if seconds else 0.0,
        p50_ms=values["p50_us"] / 1000 if requests else None,
        p99_ms=values["p99_us"] / 1000 if requests else None,
        count=requests,
        bytes_per_request=round(values["bytes"] / requests, 1) if requests else None,
        statuses=statuses,
        errors=errors,
    )


@dataclass(frozen=True)
class Check:
    """What wrk saw of every answer in a short run with a ``response()`` function."""

    responses: int
    non2xx: int
    events_min: int
    events_max: int
    done: int
    body_bytes: int
    requests: int
    bytes: int

    @property
    def bytes_per_request(self) -> float | None:
        return round(self.bytes / self.requests, 1) if self.requests else None


def run_check(port: int, key: str, kind: str) -> Check:
    argv = wrk_argv(WRK_CHECK_SCRIPT, port, key, kind, 1, CHECK_SECONDS)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_SECONDS + 120)
    return Check(**summary_line("GATEWAYCHECK", done.stdout, done.stderr, done.returncode))


def check_problem(name: str, kind: str, check: Check, events: int) -> str | None:
    """Why wrk's count of ``kind`` answers is not a count of whole answers, or None.

    ``events`` is the number of SSE ``data:`` events in one answer read by this script.
    """
    if check.responses == 0 or check.responses != check.requests:
        return f"{name} {kind}: wrk counted {check.requests} requests, saw {check.responses}"
    if check.non2xx:
        return f"{name} {kind}: {check.non2xx} of {check.responses} answers were not 2xx"
    if check.events_min != events or check.events_max != events:
        return (
            f"{name} {kind}: {check.events_min}-{check.events_max} SSE events per answer, "
            f"expected {events}"
        )
    if kind == "stream" and check.done != check.responses:
        return f"{name} stream: {check.done} of {check.responses} streams ended in [DONE]"
    return None


# The start-up check's client: one request on a raw asyncio connection (see the docstring).


def render_request(port: int, key: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
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


def one_request(port: int, key: str, kind: str, model: str = MODEL) -> tuple[int, str]:
    """One chat completion of ``kind`` (for ``model``): its status and (de-chunked) body."""
    return exchange(port, render_request(port, key, {**BODIES[kind], "model": model}))


def exchange(port: int, request: bytes) -> tuple[int, str]:
    """One HTTP/1.1 request sent as it is: the answer's status and (de-chunked) body."""

    async def go() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(30):
                writer.write(request)
                status, headers = await read_head(reader)
                body = b"".join([chunk async for chunk in iter_body(reader, headers)])
        finally:
            writer.close()
        return status, body.decode("utf-8", "replace")

    return asyncio.run(go())


def completions_received(mock: Server) -> int:
    """How many completions a standalone mock has received so far (its ``GET /stats``)."""
    request = f"GET /stats HTTP/1.1\r\nHost: 127.0.0.1:{mock.port}\r\nConnection: close\r\n\r\n"
    status, body = exchange(mock.port, request.encode())
    if status != 200:
        raise RuntimeError(f"{mock.name}: GET /stats answered {status} {body[:300]!r}")
    return int(json.loads(body)["completions"])


def sse_events(body: str) -> int:
    """``data:`` lines in a body, counted as gateway_wrk_check.lua counts them."""
    return ("\n" + body).count("\ndata:")


# --- the columns -------------------------------------------------------------------------------


def mock_argv(port: int, model: str | None = None) -> list[str]:
    """The standalone mock; ``model``: the one model it lists and serves (its default else)."""
    argv = [sys.executable, "-m", "quotagate", "mock", "--port", str(port)]
    return [*argv, "--tokens-per-second", "0", *(["--model", model] if model else [])]


def floor_argv(python: str, port: int) -> list[str]:
    argv = [python, "-m", "uvicorn", "gateway_floor:app", "--app-dir", str(ROOT / "benchmarks")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools"]
    return [*argv, "--no-access-log", "--log-level", "warning"]


def quotagate_argv(python: str, config: Path, port: int) -> list[str]:
    argv = [python, "-m", "quotagate", "serve", "--config", str(config)]
    return [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def litellm_argv(command: list[str], port: int) -> list[str]:
    return [*command, "--config", str(LITELLM_CONFIG), "--host", "127.0.0.1", "--port", str(port)]


def quotagate_config(upstream_port: int, key: str) -> str:
    """The single ``[backend]`` config: one model server, every model."""
    backend = f"""\
[backend]
kind = "openai"
url = "http://127.0.0.1:{upstream_port}/v1"
max_concurrency = {BACKEND_MAX_CONCURRENCY}
queue_timeout_ms = 30000
"""
    return gateway_config(backend, key)


def fleet_config(replica_ports: dict[str, Sequence[int]], key: str) -> str:
    """The fleet config: one ``[[backends]]`` per entry of ``FLEET_BACKENDS``, serving its one
    model from the replicas on ``replica_ports[name]``; everything else as ``quotagate_config``."""
    backends = ""
    for name, model in FLEET_BACKENDS.items():
        urls = ", ".join(f'"http://127.0.0.1:{port}/v1"' for port in replica_ports[name])
        backends += f"""\
[[backends]]
name = "{name}"
kind = "openai"
urls = [{urls}]
models = ["{model}"]
max_concurrency = {BACKEND_MAX_CONCURRENCY}
queue_timeout_ms = 30000
health_interval_s = {FLEET_HEALTH_INTERVAL_S}

"""
    return gateway_config(backends.rstrip() + "\n", key)


def tenant_admin() -> str:
    """The tenant column's ``[admin]`` table (its keys in memory, as the load's storage)."""
    digest = hashlib.sha256(TENANT_ADMIN_KEY.encode()).hexdigest()
    return f'\n[admin]\nkey_sha256 = ["{digest}"]\n'


def issue_key(port: int) -> str:
    """A key of the bench tier issued through the gateway's admin API: the tenant column's."""
    body = json.dumps({"tier": "bench", "name": "bench"}).encode()
    request = (
        b"POST /admin/keys HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (port, TENANT_ADMIN_KEY.encode(), len(body), body)
    )
    status, answer = exchange(port, request)
    if status != 201:
        raise RuntimeError(f"tenant: POST /admin/keys answered {status}: {answer[:300]}")
    return str(json.loads(answer)["key"])


def gateway_config(backends: str, key: str) -> str:
    """A quotagate config around its backend tables: memory storage, one key in one tier."""
    return f"""\
log_level = "warning"

[server]
host = "127.0.0.1"

[storage]
url = "memory://"

{backends}
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


# --- summaries ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    round: int
    kind: str
    connections: int
    variant: str
    result: Result
    cpu: dict[str, float | None]
    loadavg: tuple[float, float, float]

    @property
    def load(self) -> str:
        return load_name(self.kind, self.connections)

    def figure(self, metric: str) -> float | None:
        value = self.cpu[metric] if metric in self.cpu else getattr(self.result, metric)
        return None if value is None else float(value)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


MEDIAN_METRICS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "bytes_per_request",
    "proxy_ms",
    "mock_ms",
    "wrk_ms",
    *(f"core{core}_{what}" for core in CORES for what in ("ours", "busy")),
)


def summarize(
    measurements: Sequence[Measurement],
    loads: Sequence[str],
    mock_core: int,
    fleet_received: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Medians per column and load; paired ratios and differences per round, then medians."""
    by: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        by.setdefault((m.variant, m.load), []).append(m)
    medians: dict[str, dict[str, Any]] = {}
    for (variant, load), ms in by.items():
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for m in ms:
            statuses.update(m.result.statuses)
            errors.update(m.result.errors)
        entry: dict[str, Any] = {k: _median([m.figure(k) for m in ms]) for k in MEDIAN_METRICS}
        # The proxy's CPU over the mock's for the same requests, per run.
        entry["proxy_per_mock"] = _median(
            [
                m.cpu["proxy_ms"] / m.cpu["mock_ms"]
                for m in ms
                if m.cpu["proxy_ms"] is not None and m.cpu["mock_ms"]
            ]
        )
        entry |= {
            "requests": sum(m.result.count for m in ms),
            "statuses": dict(statuses),
            "errors": dict(errors),
            "rounds": len(ms),
        }
        medians.setdefault(variant, {})[load] = entry

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
            xv, yv = x.figure(metric), y.figure(metric)
            if xv is not None and yv is not None and yv != 0:
                values.append(how(xv, yv))
        return statistics.median(values) if values else None

    ratios: dict[str, dict[str, Any]] = {
        "share": {},
        "added_ms": {},
        "vs_litellm": {},
        "vs_baseline": {},
        "fleet_vs_quotagate": {},
        "tenant_vs_quotagate": {},
    }
    for load in loads:
        for proxy in PROXIES:
            ratios["share"][f"{proxy} {load}"] = paired(
                proxy, "direct", load, "rps", lambda q, d: q / d
            )
            for metric in ("p50_ms", "p99_ms"):
                ratios["added_ms"][f"{proxy} {load} {metric[:3]}"] = paired(
                    proxy, "direct", load, metric, lambda q, d: q - d
                )
        for metric in ("rps", "p50_ms", "p99_ms", "proxy_ms"):
            if metric == "rps":
                factor = paired("quotagate", "litellm", load, metric, lambda q, lt: q / lt)
            else:
                factor = paired("litellm", "quotagate", load, metric, lambda lt, q: lt / q)
            ratios["vs_litellm"][f"{load} {metric}"] = factor
        # This checkout's gateway over the baseline's, per round: CPU per request, req/s.
        for metric in ("proxy_ms", "rps"):
            ratios["vs_baseline"][f"{load} {metric}"] = paired(
                "quotagate", "baseline", load, metric, lambda q, b: q / b
            )
            # The fleet's gateway over the single backend's, per round: CPU per request, req/s.
            ratios["fleet_vs_quotagate"][f"{load} {metric}"] = paired(
                "fleet", "quotagate", load, metric, lambda f, q: f / q
            )
            # An issued key (the admin API's table) over a config key, per round.
            ratios["tenant_vs_quotagate"][f"{load} {metric}"] = paired(
                "tenant", "quotagate", load, metric, lambda t, q: t / q
            )
    return {
        "medians": medians,
        "ratios": ratios,
        "ceilings": ceilings(medians, loads, mock_core),
        "targets": targets(medians, ratios, fleet_received),
    }


def ceilings(
    medians: dict[str, Any], loads: Sequence[str], mock_core: int
) -> dict[str, dict[str, Any]]:
    """Per proxied load: the req/s the load core allows and the req/s the proxy could carry.

    The load core carries wrk, and in the split layout the mock too: at their CPU per request
    it cannot complete more than 1000 / (their ms) requests a second, whatever the proxy does.
    The proxy's core (shared with the mock in the shared layout) could complete at most
    1000 / (the ms spent there) on a full core.
    """
    found: dict[str, dict[str, Any]] = {}
    for proxy in (p for p in PROXIES if p in medians):
        for load, e in medians[proxy].items():
            if load not in loads or e["proxy_ms"] is None or e["mock_ms"] is None:
                continue
            mock_ms = e["mock_ms"]
            load_core_ms = (e["wrk_ms"] or 0.0) + (mock_ms if mock_core == LOAD_CORE else 0.0)
            proxy_core_ms = e["proxy_ms"] + (mock_ms if mock_core == PROXY_CORE else 0.0)
            found.setdefault(proxy, {})[load] = {
                "load_core_used": e[f"core{LOAD_CORE}_ours"],
                "load_core_ms": round(load_core_ms, 4),
                "load_core_cap_rps": round(1000 / load_core_ms) if load_core_ms else None,
                "proxy_core_used": e[f"core{PROXY_CORE}_ours"],
                "proxy_core_ms": round(proxy_core_ms, 4),
                "proxy_core_cap_rps": round(1000 / proxy_core_ms) if proxy_core_ms else None,
            }
    return found


def targets(
    medians: dict[str, Any], ratios: dict[str, Any], fleet_received: dict[str, int] | None = None
) -> dict[str, bool | None]:
    """Each target of the docstring: True, False, or None when its figures were not measured.

    ``fleet_received``: the completions each of the fleet's replicas received during the
    measured runs (None when the fleet column did not run).
    """
    gateway = medians.get("quotagate", {})

    def all_of(checks: list[bool | None]) -> bool | None:
        return None if not checks or None in checks else all(checks)

    def cpu_at_most_mock(kind: str) -> bool | None:
        values = [gateway.get(load_name(kind, c), {}).get("proxy_per_mock") for c in (10, 50)]
        return all_of([None if v is None else v <= 1.0 for v in values])

    def not_growing(kind: str) -> bool | None:
        c10 = gateway.get(load_name(kind, 10), {}).get("proxy_ms")
        c50 = gateway.get(load_name(kind, 50), {}).get("proxy_ms")
        return None if c10 is None or c50 is None else c50 <= c10 * TARGET_GROWTH

    added = ratios["added_ms"].get(f"quotagate {load_name('completion', LATENCY_CONNECTIONS)} p50")
    shares = [ratios["share"].get(f"quotagate {load_name('completion', c)}") for c in (10, 50)]
    versus = list(ratios["vs_litellm"].values())
    fleet_cpu = [
        ratios["fleet_vs_quotagate"].get(f"{load_name('completion', c)} proxy_ms") for c in (10, 50)
    ]
    big = [n for name, n in (fleet_received or {}).items() if name.startswith("fleet-big-")]
    return {
        "cpu_per_completion_at_most_mock": cpu_at_most_mock("completion"),
        "cpu_per_stream_at_most_mock": cpu_at_most_mock("stream"),
        "cpu_not_growing_c10_to_c50": all_of([not_growing(kind) for kind in KINDS]),
        "added_p50_c1_under_1ms": None if added is None else added < TARGET_ADDED_P50_MS,
        "share_at_least_60pct": all_of([None if s is None else s >= TARGET_SHARE for s in shares]),
        "beats_litellm_on_every_figure": all_of(
            [None if v is None else v > 1 for v in versus] if "litellm" in medians else []
        ),
        "fleet_cpu_within_10pct": all_of(
            [None if v is None else v <= TARGET_FLEET_CPU for v in fleet_cpu]
            if "fleet" in medians
            else []
        ),
        "fleet_load_on_every_big_replica": (
            None if fleet_received is None else len(big) == FLEET_REPLICAS and min(big) > 0
        ),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _statuses_text(entry: dict[str, Any]) -> str:
    parts = [f"{code}:{n}" for code, n in sorted(entry["statuses"].items())]
    parts += [f"err:{n}" for n in entry["errors"].values()]
    return " ".join(parts) or "none"


def layout_text(layout: str) -> str:
    if layout == "split":
        return (
            f"layout split: the proxy alone on core {PROXY_CORE}; the mock model server (and "
            f"the fleet's), wrk and this script on core {LOAD_CORE} (direct too)"
        )
    return (
        f"layout shared: the mocks and the proxy on core {PROXY_CORE}; wrk and this script on "
        f"core {LOAD_CORE}"
    )


def tenant_lines(
    medians: dict[str, Any], ratios: dict[str, Any], loads: Sequence[str]
) -> list[str]:
    """A key issued by the admin API beside a config key: the gateway's CPU ms per request."""
    single = medians.get("quotagate", {})
    lines = [
        "tenant (its key issued by the admin API, [admin] on) vs quotagate (a config key): the "
        "gateway's CPU ms per request (medians), tenant/quotagate per round, then the median:",
        f"  {'load':<15}{'tenant ms':>10}{'quotagate ms':>14}{'tenant/qg cpu':>15}"
        f"{'tenant/qg req/s':>17}",
    ]
    for load in loads:
        lines.append(
            f"  {load:<15}{_fmt(medians['tenant'].get(load, {}).get('proxy_ms'), 3):>10}"
            f"{_fmt(single.get(load, {}).get('proxy_ms'), 3):>14}"
            f"{_fmt(ratios.get(f'{load} proxy_ms'), 3):>15}"
            f"{_fmt(ratios.get(f'{load} rps'), 3):>17}"
        )
    return lines


def fleet_lines(
    fleet: dict[str, Any], medians: dict[str, Any], ratios: dict[str, Any], loads: Sequence[str]
) -> list[str]:
    """The fleet beside the single backend, load by load, and what each replica received."""
    single = medians.get("quotagate", {})
    lines = [
        f"fleet ({len(FLEET_BACKENDS)} [[backends]] x {FLEET_REPLICAS} replicas) vs quotagate "
        "(one [backend]): the gateway's CPU ms per request (medians over rounds), and "
        "fleet/quotagate (CPU per request, req/s) taken per round, then the median:",
        f"  {'load':<15}{'fleet ms':>9}{'quotagate ms':>14}{'fleet/qg cpu':>14}"
        f"{'fleet/qg req/s':>16}",
    ]
    for load in loads:
        lines.append(
            f"  {load:<15}{_fmt(medians['fleet'].get(load, {}).get('proxy_ms'), 3):>9}"
            f"{_fmt(single.get(load, {}).get('proxy_ms'), 3):>14}"
            f"{_fmt(ratios.get(f'{load} proxy_ms'), 3):>14}"
            f"{_fmt(ratios.get(f'{load} rps'), 3):>16}"
        )
    measured = fleet.get("measured")
    if measured is None:
        return lines
    lines.append(
        "completions each replica received during the measured fleet runs (its GET /stats; "
        f"wrk counted {fleet.get('wrk_counted', 0):,} whole answers):"
    )
    total = sum(measured.values()) or 1
    for backend, replicas in fleet.get("ports", {}).items():
        parts = [
            f"{name} :{port} {measured.get(name, 0):,} ({measured.get(name, 0) / total:.1%})"
            for name, port in replicas.items()
        ]
        lines.append(f"  {backend:<6}{FLEET_BACKENDS[backend]:<22}" + " · ".join(parts))
    return lines


def render_table(report: dict[str, Any]) -> str:
    setup, summary = report["setup"], report["summary"]
    medians, ratios = summary["medians"], summary["ratios"]
    loads = setup["loads"]
    lines = [
        f"quotagate gateway benchmark · {setup['rounds']} round(s) x {setup['duration']:g} s per "
        f"wrk load · {layout_text(setup['layout'])}",
        f"upstream: quotagate mock (tokens/s 0) · quotagate {setup['quotagate_version']} · "
        f"LiteLLM {setup['litellm'].get('version') or '-'} "
        f"({setup['litellm'].get('note') or 'not run'})",
        f"load average: start {setup['loadavg_start']} · end {report['loadavg_end']}",
        "",
    ]
    core0, core1 = f"core{PROXY_CORE}", f"core{LOAD_CORE}"
    for proxy in (p for p in PROXIES if p in medians):
        lines.append(
            f"{proxy} vs direct (medians over rounds; ratio, +p50/+p99 and {proxy[:2]}/mock taken "
            "per round; CPU ms per completed request; cores used by our processes there, "
            "direct run / proxied run):"
        )
        header = (
            f"{'load':<14}{'direct/s':>10}{proxy[:9] + '/s':>12}{'ratio':>7}"
            f"{proxy[:2] + ' ms':>9}{'mock ms':>9}{proxy[:2] + '/mock':>9}"
            f"{'+p50 ms':>9}{'+p99 ms':>9}{core0 + ' ' + proxy[:2]:>10}"
            f"{core1 + ' d/' + proxy[:2]:>15}"
        )
        lines.append(header)
        for load in loads:
            direct = medians.get("direct", {}).get(load, {})
            proxied = medians[proxy].get(load, {})
            latency = load.endswith(f" c{LATENCY_CONNECTIONS}")
            added = ratios["added_ms"]
            cores = f"{_fmt(direct.get(f'{core1}_ours'))} / {_fmt(proxied.get(f'{core1}_ours'))}"
            lines.append(
                f"{load:<14}{_fmt(direct.get('rps'), 0):>10}{_fmt(proxied.get('rps'), 0):>12}"
                f"{_fmt(ratios['share'].get(f'{proxy} {load}')):>7}"
                f"{_fmt(proxied.get('proxy_ms'), 3):>9}{_fmt(proxied.get('mock_ms'), 3):>9}"
                f"{_fmt(proxied.get('proxy_per_mock')):>9}"
                f"{_fmt(added.get(f'{proxy} {load} p50') if latency else None):>9}"
                f"{_fmt(added.get(f'{proxy} {load} p99') if latency else None):>9}"
                f"{_fmt(proxied.get(f'{core0}_ours')):>10}"
                f"{cores:>15}"
            )
        lines.append("")
    split = setup["layout"] == "split"
    on_load_core = "mock + wrk" if split else "wrk"
    for proxy, by_load in summary["ceilings"].items():
        on_proxy_core = proxy if split else f"{proxy} + mock"
        lines.append(
            f"ceilings of the {proxy} runs: what {core1} ({on_load_core}) and {core0} "
            f"({on_proxy_core}) could complete on a full core at the CPU per request they "
            f"spent (1000 / ms); the smaller one binds, and where it is {core1}'s, the ratio "
            f"above is what {core1} allows, not what {proxy} could carry:"
        )
        for load, c in by_load.items():
            lines.append(
                f"  {load:<15}{core1} {_fmt(c['load_core_used'])} used, "
                f"{_fmt(c['load_core_ms'], 3)} ms/req: {_fmt(c['load_core_cap_rps'], 0)}/s · "
                f"{core0} {_fmt(c['proxy_core_used'])} used, {_fmt(c['proxy_core_ms'], 3)} ms/req: "
                f"{_fmt(c['proxy_core_cap_rps'], 0)}/s"
            )
        lines.append("")

    lines.append(
        "every run (medians): req/s · p50 / p99 ms · CPU ms per request of proxy / mock / wrk · "
        "cores used: ours/all (all = /proc/stat busy, other jobs included) · bytes per request"
    )
    for variant in (v for v in VARIANTS if v in medians):
        for load in loads:
            e = medians[variant].get(load)
            if e is None:
                continue
            lines.append(
                f"  {variant:<10}{load:<14}{_fmt(e['rps'], 0):>8}/s  "
                f"{_fmt(e['p50_ms'])} / {_fmt(e['p99_ms'])} ms  "
                f"cpu {_fmt(e['proxy_ms'], 3)} / {_fmt(e['mock_ms'], 3)} / {_fmt(e['wrk_ms'], 3)}"
                f"  {core0} {_fmt(e[f'{core0}_ours'])}/{_fmt(e[f'{core0}_busy'])}"
                f"  {core1} {_fmt(e[f'{core1}_ours'])}/{_fmt(e[f'{core1}_busy'])}"
                f"  {_fmt(e['bytes_per_request'], 0)} B  {_statuses_text(e)}"
            )
    lines.append("")
    lines.append("wrk check (1 s, one connection, every answer's body seen by the Lua script):")
    for name, kinds in report["checks"].items():
        for kind, check in kinds.items():
            lines.append(
                f"  {name:<10}{kind:<11}{check['responses']} answers, {check['non2xx']} non-2xx, "
                f"{check['events_min']}-{check['events_max']} SSE events each (expected "
                f"{check['expected_events']}), {check['done']} ending in [DONE], "
                f"{_fmt(check['bytes_per_request'], 0)} bytes per request"
            )

    baseline = ratios["vs_baseline"]
    if "baseline" in medians and any(v is not None for v in baseline.values()):
        lines.append("")
        lines.append("quotagate / baseline (medians of per-round ratios): CPU per request · req/s")
        for load in loads:
            lines.append(
                f"  {load:<15}{_fmt(baseline.get(f'{load} proxy_ms'), 3)} · "
                f"{_fmt(baseline.get(f'{load} rps'), 3)}"
            )

    if "fleet" in medians:
        lines.append("")
        lines.extend(fleet_lines(setup["fleet"], medians, ratios["fleet_vs_quotagate"], loads))

    if "tenant" in medians:
        lines.append("")
        lines.extend(tenant_lines(medians, ratios["tenant_vs_quotagate"], loads))

    versus = ratios["vs_litellm"]
    if "litellm" in medians and any(v is not None for v in versus.values()):
        lines.append("")
        lines.append(
            "quotagate vs LiteLLM (x better: req/s quotagate/litellm; latency and proxy CPU "
            "litellm/quotagate):"
        )
        for load in loads:
            lines.append(
                f"  {load:<15}"
                + " · ".join(
                    f"{label} x{_fmt(versus.get(f'{load} {metric}'))}"
                    for metric, label in (
                        ("rps", "req/s"),
                        ("p50_ms", "p50"),
                        ("p99_ms", "p99"),
                        ("proxy_ms", "cpu"),
                    )
                )
            )
    lines.append("")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    goals = summary["targets"]
    lines.append(
        "targets: gateway CPU ≤ mock's (c10, c50): completion "
        f"{verdict(goals['cpu_per_completion_at_most_mock'])}, stream "
        f"{verdict(goals['cpu_per_stream_at_most_mock'])} · CPU per request not growing c10 -> "
        f"c50 (within {TARGET_GROWTH - 1:.0%}): {verdict(goals['cpu_not_growing_c10_to_c50'])}"
    )
    lines.append(
        f"         added p50 at c{LATENCY_CONNECTIONS} < {TARGET_ADDED_P50_MS:g} ms: "
        f"{verdict(goals['added_p50_c1_under_1ms'])} · req/s ≥ {TARGET_SHARE:.0%} of direct "
        f"(completion c10, c50): {verdict(goals['share_at_least_60pct'])} · beats LiteLLM on "
        f"every figure: {verdict(goals['beats_litellm_on_every_figure'])}"
    )
    lines.append(
        f"         fleet CPU ≤ {TARGET_FLEET_CPU:.0%} of quotagate's (completion c10, c50): "
        f"{verdict(goals['fleet_cpu_within_10pct'])} · the fleet's load on every replica of big: "
        f"{verdict(goals['fleet_load_on_every_big_replica'])}"
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
    kind: str,
    connections: int,
    key: str,
    seconds: float,
    all_servers: Sequence[Server],
) -> tuple[Result, dict[str, float | None]]:
    before = cpu_sample(all_servers)
    result = run_wrk(column.port, key, kind, connections, seconds)
    after = cpu_sample(all_servers)
    return result, cpu_figures(before, after, all_servers, column, result.count)


def log(message: str, out: TextIO) -> None:
    print(message, file=out, flush=True)


def start_litellm(
    args: argparse.Namespace,
    mock: Server,
    key: str,
    workdir: Path,
    litellm: dict[str, Any],
    servers: list[Server],
) -> Server | str:
    """The started LiteLLM proxy, or why its column is skipped."""
    problem = litellm_problem(args.litellm)
    if problem is not None:
        return problem
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
        PROXY_CORE,
        workdir / "litellm.log",
        workdir,
        child_env(
            {
                "GATEWAY_BENCH_UPSTREAM": f"http://127.0.0.1:{mock.port}/v1",
                "GATEWAY_BENCH_LITELLM_MASTER_KEY": "sk-master-" + secrets.token_hex(24),
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
    except RuntimeError as exc:
        proxy.stop()
        return f"LiteLLM column skipped: the proxy did not start: {exc}"
    return proxy


def check_column(
    column: Column, key: str, expected_events: dict[str, int]
) -> tuple[dict[str, Any], str | None]:
    """One answer of each kind read here, then the wrk check: its figures, and any problem."""
    checks: dict[str, Any] = {}
    for kind in KINDS:
        status, body = one_request(column.port, key, kind)
        if status != 200:
            return checks, f"{column.name} {kind}: POST {PATH} answered {status} {body[:300]!r}"
        events = sse_events(body)
        if events != expected_events[kind]:
            return checks, (
                f"{column.name} {kind}: {events} SSE events, the mock sends "
                f"{expected_events[kind]}: {body[-300:]!r}"
            )
        check = run_check(column.port, key, kind)
        checks[kind] = {
            **asdict(check),
            "bytes_per_request": check.bytes_per_request,
            "expected_events": expected_events[kind],
        }
        problem = check_problem(column.name, kind, check, expected_events[kind])
        if problem is not None:
            return checks, problem
    return checks, None


def start_fleet_mocks(
    core: int, workdir: Path, env: dict[str, str], servers: list[Server], out: TextIO
) -> dict[str, list[Server]]:
    """The fleet's replicas: ``FLEET_REPLICAS`` standalone mocks per backend, each serving that
    backend's one model, on ``core`` (where the single mock is)."""
    replicas: dict[str, list[Server]] = {}
    for backend, model in FLEET_BACKENDS.items():
        for i in range(1, FLEET_REPLICAS + 1):
            name = f"fleet-{backend}-{i}"
            mock = Server(
                name,
                functools.partial(mock_argv, model=model),
                "/v1/models",
                core,
                workdir / f"{name}.log",
                workdir,
                env,
            )
            servers.append(mock)
            mock.start()
            log(
                f"fleet replica {name} ({model}): pid {mock.pid}, port {mock.port}, core {core}",
                out,
            )
            replicas.setdefault(backend, []).append(mock)
    return replicas


def check_fleet(column: Column, key: str) -> tuple[dict[str, Any], str | None]:
    """After ``check_column``: both replicas of "big" received some of its requests, and one
    completion for the other backend's model went to that backend (and only that one)."""
    big = {m.name: completions_received(m) for m in column.mocks}
    if min(big.values()) == 0:
        return {"big": big}, f"fleet: the start-up check's requests were not spread: {big}"
    small_model = FLEET_BACKENDS["small"]
    status, body = one_request(column.port, key, "completion", small_model)
    small = {m.name: completions_received(m) for m in column.standby}
    found = {"big": big, "small": small, "small_status": status}
    if status != 200 or json.loads(body).get("model") != small_model:
        return found, f"fleet: a completion for {small_model} answered {status} {body[:300]!r}"
    if sum(small.values()) != 1 or {m.name: completions_received(m) for m in column.mocks} != big:
        return found, f"fleet: one completion for {small_model} reached {small} and big {big}"
    return found, None


def run(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    key = "sk-bench-" + secrets.token_hex(12)
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    servers: list[Server] = []
    columns: dict[str, Column] = {}
    checks: dict[str, Any] = {}
    wanted = [v for v in VARIANTS if v in args.variants]
    litellm: dict[str, Any] = {"path": args.litellm}
    measurements: list[Measurement] = []
    mock_core = LOAD_CORE if args.layout == "split" else PROXY_CORE
    plan = [(kind, c) for kind in KINDS for c in args.connections]
    logs: dict[str, str] = {}
    fleet: dict[str, Any] = {}  # the fleet column's replicas and what each received
    try:
        env = child_env()
        mock = Server(
            "mock", mock_argv, "/v1/models", mock_core, workdir / "mock.log", workdir, env
        )
        servers.append(mock)
        mock.start()
        log(f"mock upstream: pid {mock.pid}, port {mock.port}, core {mock.core}", out)
        if "direct" in wanted:
            columns["direct"] = Column("direct", mock.port, None, (mock,))

        gateways = {
            "quotagate": sys.executable,
            "tenant": sys.executable,
            "fleet": sys.executable,
            "baseline": args.baseline_python,
        }
        for name, python in gateways.items():
            if name not in wanted or not python:
                continue
            mocks: tuple[Server, ...] = (mock,)
            standby: tuple[Server, ...] = ()
            if name == "fleet":
                replicas = start_fleet_mocks(mock_core, workdir, env, servers, out)
                fleet["ports"] = {
                    backend: {m.name: m.port for m in ms} for backend, ms in replicas.items()
                }
                text = fleet_config({b: [m.port for m in ms] for b, ms in replicas.items()}, key)
                mocks, standby = tuple(replicas["big"]), tuple(replicas["small"])
            elif name == "tenant":
                text = quotagate_config(mock.port, key) + tenant_admin()
            else:
                text = quotagate_config(mock.port, key)
            config = workdir / f"{name}.toml"
            config.write_text(text)
            gateway = Server(
                name,
                functools.partial(quotagate_argv, python, config),
                "/health",
                PROXY_CORE,
                workdir / f"{name}.log",
                workdir,
                env,
            )
            servers.append(gateway)
            gateway.start()
            log(f"{name} gateway ({python}): pid {gateway.pid}, port {gateway.port}, core 0", out)
            own = issue_key(gateway.port) if name == "tenant" else None
            columns[name] = Column(name, gateway.port, gateway, mocks, standby, own)

        if "floor" in wanted:
            floor = Server(
                "floor",
                functools.partial(floor_argv, sys.executable),
                "/health",
                PROXY_CORE,
                workdir / "floor.log",
                workdir,
                env | {"GATEWAY_FLOOR_UPSTREAM": f"http://127.0.0.1:{mock.port}/v1"},
            )
            servers.append(floor)
            floor.start()
            log(f"floor proxy: pid {floor.pid}, port {floor.port}, core 0", out)
            columns["floor"] = Column("floor", floor.port, floor, (mock,))

        if "litellm" in wanted:
            started = start_litellm(args, mock, key, workdir, litellm, servers)
            if isinstance(started, Server):
                log(f"litellm proxy: pid {started.pid}, port {started.port}, core 0", out)
                columns["litellm"] = Column("litellm", started.port, started, (mock,))
            else:
                log(started, out)
                notes.append(started)
                litellm["skipped"] = started

        # What the mock itself sends: the count every column's answers must show.
        expected_events = {kind: sse_events(one_request(mock.port, key, kind)[1]) for kind in KINDS}
        for name, column in list(columns.items()):
            try:
                checks[name], problem = check_column(column, column.key or key, expected_events)
                if problem is None and name == "fleet":
                    fleet["check"], problem = check_fleet(column, key)
            except (RuntimeError, OSError, EOFError, ValueError) as exc:  # no answer, no wrk line
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                continue
            problem = f"{name} failed its start-up check: {problem}"
            if name != "litellm":
                raise RuntimeError(problem)
            log(problem, out)
            notes.append(problem)
            litellm["skipped"] = problem
            del columns[name]

        for name, column in columns.items():  # warm-up, not measured
            for kind in KINDS:
                warm = run_wrk(column.port, key, kind, WARMUP_CONNECTIONS, WARMUP_SECONDS)
                if warm.bad:
                    notes.append(f"{name} {kind} warm-up: {warm.statuses} {warm.errors}")

        fleet_column = columns.get("fleet")
        received: dict[str, int] = {}
        if fleet_column is not None:  # what each replica receives from here on is the load's
            received = {m.name: completions_received(m) for m in fleet_column.servers[:-1]}
        order = [v for v in VARIANTS if v in columns]
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            log(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})", out)
            for kind, connections in plan:
                for name in rotated:
                    column = columns[name]
                    dead = [s.name for s in column.servers if not s.alive()]
                    if dead:
                        raise RuntimeError(
                            f"{name}: {dead} exited: {column.servers[-1].log_tail(10)}"
                        )
                    result, cpu = measure(
                        column, kind, connections, column.key or key, args.duration, servers
                    )
                    loadavg = os.getloadavg()
                    m = Measurement(r + 1, kind, connections, name, result, cpu, loadavg)
                    measurements.append(m)
                    expected = checks[name][kind]["bytes_per_request"]
                    if (
                        result.bytes_per_request is not None
                        and result.bytes_per_request < expected * BYTES_TOLERANCE
                    ):
                        notes.append(
                            f"{name} {m.load} round {r + 1}: {result.bytes_per_request:.0f} bytes "
                            f"per request against the check's {expected:.0f}: answers counted "
                            "before their end?"
                        )
                    log(
                        f"  {m.load:<14} {name:<10} {result.rps:>8,.0f}/s  p50 "
                        f"{_fmt(result.p50_ms)} ms  p99 {_fmt(result.p99_ms)} ms  cpu ms/req "
                        f"proxy {_fmt(cpu['proxy_ms'], 3)} mock {_fmt(cpu['mock_ms'], 3)} "
                        f"wrk {_fmt(cpu['wrk_ms'], 3)}  core1 {_fmt(cpu['core1_ours'])}"
                        f"/{_fmt(cpu['core1_busy'])}  "
                        f"{_statuses_text({'statuses': result.statuses, 'errors': result.errors})}",
                        out,
                    )
        if fleet_column is not None:
            fleet["measured"] = {
                m.name: completions_received(m) - received[m.name]
                for m in fleet_column.servers[:-1]
            }
    finally:
        for server in reversed(servers):
            server.stop()
        logs = {server.name: server.log_tail(20) for server in servers}
        shutil.rmtree(workdir, ignore_errors=True)

    notes += [
        f"non-2xx or errors: {m.variant} {m.load} round {m.round}: "
        f"{m.result.statuses} {m.result.errors}"
        for m in measurements
        if m.result.bad
    ]
    notes += [
        f"no request completed: {m.variant} {m.load} round {m.round} (a longer --duration?)"
        for m in measurements
        if m.result.count == 0
    ]
    measured = fleet.get("measured")
    if measured is not None:
        fleet["wrk_counted"] = sum(m.result.count for m in measurements if m.variant == "fleet")
        idle = {n: c for n, c in measured.items() if c and n.startswith("fleet-small-")}
        if idle:
            notes.append(f"fleet: the load asks for {MODEL} only, yet small received {idle}")
    loads = [load_name(kind, c) for kind, c in plan]
    return {
        "setup": {
            "duration": args.duration,
            "rounds": args.rounds,
            "layout": args.layout,
            "loads": loads,
            "bodies": BODIES,
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
            "fleet": {
                "backends": FLEET_BACKENDS,
                "health_interval_s": FLEET_HEALTH_INTERVAL_S,
                **fleet,
            },
        },
        "checks": checks,
        "measurements": [
            {**asdict(m), "load": m.load, "result": asdict(m.result)} for m in measurements
        ],
        "summary": summarize(measurements, loads, mock_core, measured),
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
        description="quotagate gateway (one backend, and a fleet) vs direct vs LiteLLM proxy, "
        "in front of the mock model."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-python",
        help="another checkout's venv python: its quotagate is the baseline column (before/after"
        " in one run)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per load, 1 round")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--layout",
        choices=("split", "shared"),
        default="split",
        help="split: the proxy alone on core 0, the mock with wrk on core 1 (direct too); "
        "shared: proxy and mock on core 0",
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
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTIONS)),
        help=f"comma-separated connection counts (added latency is taken at {LATENCY_CONNECTIONS})",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; expected {list(VARIANTS)}")
    try:
        args.connections = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--connections: expected numbers like 1,10,50, got {args.connections!r}")
    if args.rounds < 1 or args.duration <= 0 or not args.connections or args.connections[0] < 1:
        parser.error("--rounds, --duration and --connections must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("needs at least two cores (the proxy on core 0, the load on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CORE})  # this script (idle while wrk runs): the load core
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

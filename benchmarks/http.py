"""HTTP throughput of the seed tutorial's app: bare FastAPI, slowapi, quotagate; memory and Redis.

Each variant of ``benchmarks/http_apps.py`` is served in turn by uvicorn with ONE worker
(``--loop uvloop --http httptools --no-access-log --log-level warning``) pinned to core 0; the
load generator, Redis and this driver are pinned to core 1. Variants:

    bare              FastAPI, POST /v1/completions returning a small JSON, no limiting
    bare-headers      the same sending the five rate-limit header fields quotagate sends, with
                      fixed values, no limiting: the floor of any limiter that sends them
    slowapi-memory    the seed tutorial's slowapi code (headers_enabled=True), memory://
    slowapi-redis     the same with storage_uri="redis://127.0.0.1:PORT/0"
    quotagate-memory  the same app on quotagate.fastapi.Limiter(key_func=api_key_or_ip)
    quotagate-redis   the same with the Redis URL

Loads (loopback, 50 connections, ``--duration`` seconds each, after a 1 s warm-up):

    one-key     hey -z 10s -c 50 -m POST -H "X-API-Key: bench-key-1" -T application/json
                    -d '{"prompt":"hi"}' ...      limit --rate (default 1000000/minute)
    random-key  wrk -t1 -c50 -d10s -s benchmarks/http_wrk_random_key.lua ...: a random
                X-API-Key of 100,000 per request   limit --random-rate (default 1000/day)

Every request must be ADMITTED (the allowed path is measured); the non-2xx share is printed so
that a broken variant shows. Each load gets a fresh server (a clean RSS baseline, and its own
rate), Redis gets FLUSHALL before each server start. Rounds interleave the variants (bare,
slowapi-memory, ..., then the next round); throughput is reported as the median over rounds and
as the median of the per-round ratios to the bare app's throughput in the SAME round.

On a shared machine: before each measurement the script waits (up to ``--max-wait`` s) until
other processes use under 0.10 of core 0 and 0.25 cores in all; it measures the CPU that others
used during each run (/proc/stat busy time minus our processes' own), measures a disturbed run
again (up to ``--redo-noisy`` times) keeping the least disturbed attempt, and lists rows that
stayed disturbed under "Problems". A Redis variant whose server made fewer than 0.9 script calls
per request (quotagate's in-memory fallback took over) and any server log output are listed too.

Why ``--random-rate 1000/day``: a state is only worth measuring while it is held. quotagate's
GCRA drops a key's state as soon as its bucket is full again (TAT <= now), which at
1000000/minute is 60 us after the hit, so RSS per key would read ~0; limits' fixed window keeps
every key until its window ends. At 1000/day a hit holds GCRA state for 86.4 s and a fixed
window for the rest of the day, so both libraries hold every key of the run, and no key (hit ~1
to 5 times) comes near its limit. ``--random-rate 1000000/minute`` gives the other reading.

Server CPU: ``cpu us`` is the uvicorn process's CPU time (utime + stime) per response over the
measured run, and ``cpu x`` bare's cpu us over the variant's (same round, same load). When other
processes take the server's core, req/s drops but CPU per request barely moves, so ``cpu x``
is the steadier estimate of the throughput ratio for CPU-bound variants (not for slowapi's
blocking Redis calls, where the server waits with its core idle).

Redis figures, from ``INFO`` deltas around each load (our own INFO left out):
    cmds/req      every command per admitted request (commands run inside Lua scripts count too)
    scripts/req   EVALSHA/EVAL/FCALL calls per request
    top/req       commands sent by the server process itself (not from inside a script), by
                  classifying each command with a MONITOR probe of 20 sequential requests
    reads/req     ``total_reads_processed`` per request: socket reads by Redis, i.e. round trips
                  (one pipeline of many calls is one read)
Memory, for the random-key load only:
    rss B/key     growth of the uvicorn process's VmRSS (/proc/PID/status) over the measured wrk
                  run divided by the number of distinct keys the wrk script generated (it counts
                  them; warm-up keys use another prefix so that all counted keys are new)
    redis B/key   growth of Redis ``used_memory`` over the same run, per distinct key

Run:  .venv/bin/python benchmarks/http.py [--duration 10] [--rounds 3] [--quick] [--json]
          [--variants bare,quotagate-memory,...] [--loads one-key,random-key]
          [--rate 1000000/minute] [--random-rate 1000/day] [--redo-noisy 2] [--max-wait 180]

``--quick`` is a 3 s, 1 round smoke run. ``--json`` prints the results as JSON on stdout (the
table then goes to stderr). Needs ``hey``, ``wrk``, ``redis-server`` and ``taskset`` on PATH and
at least two cores. Note: this file shadows the stdlib ``http`` package for modules imported by
this script (its directory is ``sys.path[0]``), so it imports nothing that needs ``http``
(``quotagate.testing``, its process runner, is standard library only for that reason).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import redis

from quotagate.testing import ServerProcess, ServerStartError, wait_until

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
WRK_SCRIPT = BENCH_DIR / "http_wrk_random_key.lua"
SERVER_CORE = 0
LOAD_CORE = 1
CONNECTIONS = 50
ONE_KEY = "bench-key-1"
BODY = '{"prompt":"hi"}'
ENDPOINT = "/v1/completions"
WARMUP_SECONDS = 1
PROBE_REQUESTS = 20
NOISY_CORE0 = 0.10  # cores used on the server's core by other processes: a disturbed run
NOISY_ALL = 0.25
SCRIPT_COMMANDS = frozenset({"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"})
IGNORED_COMMANDS = frozenset({"info", "flushall", "monitor", "ping", "dbsize"})
UVICORN_FLAGS = (
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
)

Library = Literal["bare", "bare-headers", "slowapi", "quotagate"]
Backend = Literal["none", "memory", "redis"]
LoadName = Literal["one-key", "random-key"]
LOADS: tuple[LoadName, ...] = ("one-key", "random-key")


@dataclass(frozen=True)
class Variant:
    name: str
    library: Library
    backend: Backend


VARIANTS = (
    Variant("bare", "bare", "none"),
    Variant("bare-headers", "bare-headers", "none"),
    Variant("slowapi-memory", "slowapi", "memory"),
    Variant("slowapi-redis", "slowapi", "redis"),
    Variant("quotagate-memory", "quotagate", "memory"),
    Variant("quotagate-redis", "quotagate", "redis"),
)

# (variant, load, what): slowapi figures measured earlier on this kind of machine, and targets.
REFERENCES: tuple[tuple[str, LoadName, str, float, float, str], ...] = (
    ("quotagate-memory", "one-key", "ratio_to_bare", 0.73, 0.90, ">="),
    ("quotagate-redis", "one-key", "ratio_to_bare", 0.26, 0.60, ">="),
    ("quotagate-memory", "random-key", "ratio_to_bare", 0.52, 0.85, ">="),
    ("quotagate-memory", "random-key", "rss_bytes_per_key", 365.0, 200.0, "<="),
)


# --- processes -------------------------------------------------------------------------------


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far: machine-wide and core 0 busy time, and each of our processes."""

    wall: float
    busy_all: float
    busy_core0: float
    ours: float  # this driver and its finished children (the load generator)
    server: float
    redis: float


def cpu_busy() -> tuple[float, float]:
    """Busy seconds (all cores, core 0) from /proc/stat: every state but idle and iowait."""
    tick = os.sysconf("SC_CLK_TCK")
    busy: dict[str, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in ("cpu", f"cpu{SERVER_CORE}"):
            values = [int(x) for x in fields]
            busy[name] = (sum(values[:8]) - values[3] - values[4]) / tick
    return busy["cpu"], busy[f"cpu{SERVER_CORE}"]


def process_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_sample(server_pid: int, redis_pid: int) -> CpuSample:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    busy_all, busy_core0 = cpu_busy()
    return CpuSample(
        time.monotonic(),
        busy_all,
        busy_core0,
        ours,
        process_cpu(server_pid),
        process_cpu(redis_pid),
    )


def foreign_cpu(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Cores used during a run by processes that are not ours (other jobs on the machine), on
    core 0 (the server's) and overall, plus the server's own use of its core. Kernel work for
    loopback traffic is charged to no process, so even a quiet machine shows a little."""
    wall = after.wall - before.wall
    server = after.server - before.server
    ours = server + (after.ours - before.ours) + (after.redis - before.redis)
    return {
        "server_cores": server / wall,
        "server_cpu_s": server,
        "other_core0": max(0.0, (after.busy_core0 - before.busy_core0 - server) / wall),
        "other_all": max(0.0, (after.busy_all - before.busy_all - ours) / wall),
    }


# --- Redis -----------------------------------------------------------------------------------


@dataclass
class RedisServer:
    process: ServerProcess
    client: redis.Redis

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass(frozen=True)
class RedisSnapshot:
    calls: Counter[str]
    reads: int
    used_memory: int
    keys: int


def start_redis(workdir: Path) -> RedisServer:
    """redis-server on a free loopback port, pinned to the load core; stopped by the caller."""
    argv = ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(workdir)]
    process = ServerProcess(
        pinned(LOAD_CORE, argv),
        name="redis-server",
        cwd=ROOT,
        log=workdir / "redis.log",
        startup_timeout=10,
        port_retries=2,
    )
    process.start()
    client = redis.Redis(host="127.0.0.1", port=process.port, socket_timeout=10)
    try:
        wait_until(lambda: _pong(client), 10, "redis-server answers PING")
    except TimeoutError:
        process.stop()
        raise RuntimeError(f"redis-server did not answer:\n{process.output()}") from None
    return RedisServer(process, client)


def _pong(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def redis_snapshot(client: redis.Redis) -> RedisSnapshot:
    stats: dict[str, dict[str, int]] = client.info("commandstats")
    calls = Counter(
        {
            name.removeprefix("cmdstat_"): int(row["calls"])
            for name, row in stats.items()
            if name.removeprefix("cmdstat_") not in IGNORED_COMMANDS
        }
    )
    info: dict[str, Any] = client.info()
    return RedisSnapshot(
        calls, int(info["total_reads_processed"]), int(info["used_memory"]), int(client.dbsize())
    )


def monitor_contexts(redis_port: int, server_port: int, n: int) -> dict[str, Counter[str]]:
    """Send ``n`` requests to the server while MONITORing Redis (half on one key, half on a
    new key each): commands by context, ``top`` (sent by a client) or ``lua`` (in a script)."""
    contexts: dict[str, Counter[str]] = {"top": Counter(), "lua": Counter()}
    line_re = re.compile(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')
    with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as mon:
        mon.sendall(b"MONITOR\r\n")
        if not mon.recv(64).startswith(b"+OK"):
            raise RuntimeError("MONITOR refused")
        for i in range(n):
            http_post(server_port, ONE_KEY if i % 2 else f"probe-key-{i}-{time.time_ns()}")
        mon.settimeout(0.5)
        data = b""
        try:
            while chunk := mon.recv(1 << 16):
                data += chunk
        except TimeoutError:
            pass
    for line in data.decode(errors="replace").splitlines():
        match = line_re.match(line)
        if match:
            where = "lua" if match.group(1) == "lua" else "top"
            contexts[where][match.group(2).lower()] += 1
    return contexts


# --- the server under test ---------------------------------------------------------------------


class Server(ServerProcess):
    """A variant of ``http_apps.py`` under uvicorn, pinned to the server core, ready once
    ``POST /v1/completions`` answers 200."""

    def __init__(self, variant: Variant, rate: str, redis_url: str, log: Path) -> None:
        env = dict(os.environ)
        env["HTTP_BENCH_LIBRARY"] = variant.library
        env["HTTP_BENCH_STORAGE"] = redis_url if variant.backend == "redis" else "memory://"
        env["HTTP_BENCH_RATE"] = rate
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        argv = [sys.executable, "-m", "uvicorn", "http_apps:app", "--app-dir", str(BENCH_DIR)]
        argv += ["--host", "127.0.0.1", "--port", "{port}", *UVICORN_FLAGS]
        super().__init__(
            pinned(SERVER_CORE, argv),
            name=variant.name,
            env=env,
            cwd=ROOT,
            log=log,
            startup_timeout=30,
            port_retries=2,
        )
        self.variant = variant

    def ready(self) -> bool:
        try:
            status = http_post(self.port, "bench-ready")
        except OSError:
            return False
        if status not in (0, 200):
            raise ServerStartError(f"{self.name} answered {status}, not 200", self.output())
        return status == 200


def http_post(port: int, api_key: str) -> int:
    """One POST /v1/completions on a fresh connection; the HTTP status."""
    request = (
        f"POST {ENDPOINT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
        f"Connection: close\r\n\r\n{BODY}"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


# --- loads -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int  # responses received
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    errors: dict[str, int]  # socket or client errors, by kind
    distinct_keys: int | None = None

    @property
    def non2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not code.startswith("2"))

    @property
    def failed_share(self) -> float:
        """Share of attempts that were not a 2xx response (non-2xx and errors)."""
        attempts = self.requests + sum(self.errors.values())
        return (self.non2xx + sum(self.errors.values())) / attempts if attempts else 1.0


def hey_argv(port: int, seconds: int) -> list[str]:
    return pinned(
        LOAD_CORE,
        [
            "hey", "-z", f"{seconds}s", "-c", str(CONNECTIONS), "-cpus", "1", "-m", "POST",
            "-H", f"X-API-Key: {ONE_KEY}", "-T", "application/json", "-d", BODY,
            f"http://127.0.0.1:{port}{ENDPOINT}",
        ],
    )  # fmt: skip


def wrk_argv(port: int, seconds: int, key_prefix: str) -> list[str]:
    return pinned(
        LOAD_CORE,
        [
            "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(WRK_SCRIPT),
            f"http://127.0.0.1:{port}{ENDPOINT}", "--", key_prefix,
        ],
    )  # fmt: skip


def run_tool(argv: Sequence[str], seconds: int) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=seconds + 60, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[3]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def parse_hey(text: str) -> LoadResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    percentiles = {
        int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)
    }
    statuses = {code: int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text)}
    errors: dict[str, int] = {}
    if "Error distribution:" in text:
        for count, message in re.findall(
            r"\[(\d+)\]\s+(.+)", text.split("Error distribution:", 1)[1]
        ):
            errors[message.strip()[:200]] = int(count)
    if rps is None:
        raise RuntimeError(f"cannot parse hey output:\n{text}")
    return LoadResult(
        requests=sum(statuses.values()),
        rps=float(rps.group(1)),
        p50_ms=percentiles.get(50, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
        statuses=statuses,
        errors=errors,
    )


def parse_wrk(text: str) -> LoadResult:
    line = next((x for x in text.splitlines() if x.startswith("HTTPBENCH ")), None)
    if line is None:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    values = dict(pair.split("=", 1) for pair in line.split()[1:])
    requests = int(values["requests"])
    seconds = int(values["duration_us"]) / 1e6
    errors = {
        kind: int(values[f"errors_{kind}"])
        for kind in ("connect", "read", "write", "timeout")
        if int(values[f"errors_{kind}"])
    }
    return LoadResult(
        requests=requests,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=int(values["p50_us"]) / 1000,
        p99_ms=int(values["p99_us"]) / 1000,
        statuses={
            k.removeprefix("status_"): int(v) for k, v in values.items() if k[:7] == "status_"
        },
        errors=errors,
        distinct_keys=int(values["distinct"]),
    )


def run_load(load: LoadName, port: int, seconds: int, *, warmup: bool = False) -> LoadResult:
    if load == "one-key":
        return parse_hey(run_tool(hey_argv(port, seconds), seconds))
    prefix = "warmup-key-" if warmup else "bench-key-"
    return parse_wrk(run_tool(wrk_argv(port, seconds, prefix), seconds))


# --- one measurement -------------------------------------------------------------------------


@dataclass
class Measurement:
    round: int
    variant: str
    load: LoadName
    rate: str
    result: LoadResult
    ratio_to_bare: float | None = None
    cpu_ratio_to_bare: float | None = None
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    redis_calls: dict[str, int] | None = None
    redis_reads: int | None = None
    redis_memory_delta: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    redis_keys_after: int | None = None
    monitor: dict[str, dict[str, int]] | None = None
    server_log: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU time per response: robust to other processes taking the core."""
        cpu = self.cpu.get("server_cpu_s")
        return cpu * 1e6 / self.result.requests if cpu and self.result.requests else None

    @property
    def rss_bytes_per_key(self) -> float | None:
        keys = self.result.distinct_keys
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / keys if keys else None

    @property
    def redis_bytes_per_key(self) -> float | None:
        keys = self.result.distinct_keys
        if self.redis_memory_delta is None or not keys:
            return None
        return self.redis_memory_delta / keys


@dataclass
class Bench:
    redis: RedisServer
    workdir: Path
    args: argparse.Namespace
    monitored: set[str] = field(default_factory=set)

    def measure(self, round_no: int, variant: Variant, load: LoadName) -> Measurement:
        rate = self.args.rate if load == "one-key" else self.args.random_rate
        self.redis.client.flushall()
        log = self.workdir / f"server-{variant.name}-{load}-r{round_no}.log"
        server = Server(variant, rate, self.redis.url, log)
        server.start()
        try:
            run_load(load, server.port, self.args.warmup, warmup=True)
            measurement = self._measured_run(round_no, server, load, rate)
            if variant.backend == "redis" and variant.name not in self.monitored:
                self.monitored.add(variant.name)
                contexts = monitor_contexts(self.redis.port, server.port, PROBE_REQUESTS)
                measurement.monitor = {k: dict(v) for k, v in contexts.items()}
        finally:
            server.stop()
        measurement.server_log = [x for x in server.output().splitlines() if x.strip()][:40]
        return measurement

    def _measured_run(
        self, round_no: int, server: Server, load: LoadName, rate: str
    ) -> Measurement:
        redis_before = redis_snapshot(self.redis.client)
        server_pid, redis_pid = server.pid, self.redis.process.pid
        assert server_pid is not None
        assert redis_pid is not None
        rss_before = rss_kib(server_pid)
        cpu_before = cpu_sample(server_pid, redis_pid)
        result = run_load(load, server.port, self.args.duration)
        cpu_after = cpu_sample(server_pid, redis_pid)
        rss_after = rss_kib(server_pid)
        redis_after = redis_snapshot(self.redis.client)
        measurement = Measurement(
            round_no,
            server.variant.name,
            load,
            rate,
            result,
            rss_before_kib=rss_before,
            rss_after_kib=rss_after,
        )
        measurement.cpu = foreign_cpu(cpu_before, cpu_after)
        if server.variant.backend == "redis":
            calls = redis_after.calls - redis_before.calls
            measurement.redis_calls = dict(calls)
            measurement.redis_reads = redis_after.reads - redis_before.reads
            measurement.redis_memory_delta = redis_after.used_memory - redis_before.used_memory
            measurement.redis_keys_after = redis_after.keys
        return measurement


def run_rounds(
    bench: Bench, variants: Sequence[Variant], loads: Sequence[LoadName]
) -> list[Measurement]:
    measurements: list[Measurement] = []
    rounds = bench.args.rounds
    for round_no in range(1, rounds + 1):
        this_round: list[Measurement] = []
        for variant in variants:
            for load in loads:
                this_round.append(measure_quietly(bench, round_no, variant, load))
        set_ratios(this_round)
        measurements += this_round
    return measurements


def wait_for_quiet(max_wait: float) -> None:
    """Before a measurement: wait (up to ``max_wait`` s) until other processes leave the
    machine alone, judged by 1 s samples of /proc/stat (only our idle Redis runs meanwhile)."""
    deadline = time.monotonic() + max_wait
    waited = False
    while True:
        before = (time.monotonic(), *cpu_busy())
        time.sleep(1.0)
        after = (time.monotonic(), *cpu_busy())
        wall = after[0] - before[0]
        load = {
            "other_all": (after[1] - before[1]) / wall,
            "other_core0": (after[2] - before[2]) / wall,
        }
        if not noisy(load):
            return
        if time.monotonic() > deadline:
            progress(f"  machine still busy after {max_wait:.0f} s ({load_text(load)}): measuring")
            return
        if not waited:
            progress(f"  machine busy ({load_text(load)}): waiting up to {max_wait:.0f} s")
            waited = True
        time.sleep(4.0)


def load_text(cpu: dict[str, float]) -> str:
    return f"others use {cpu['other_core0']:.2f} of core 0, {cpu['other_all']:.2f} cores in all"


def measure_quietly(bench: Bench, round_no: int, variant: Variant, load: LoadName) -> Measurement:
    """Measure; while other processes disturbed the run (CPU on the server's core, or on the
    machine), wait and measure again, up to ``--redo-noisy`` times; keep the least disturbed."""
    tag = f"[round {round_no}/{bench.args.rounds}] {variant.name:<17} {load:<10} "
    wait_for_quiet(bench.args.max_wait)
    m = bench.measure(round_no, variant, load)
    progress(tag + brief(m))
    best, attempts = m, 1
    while noisy(m.cpu) and attempts <= bench.args.redo_noisy:
        progress(f"{tag}disturbed by other processes: again when quiet")
        wait_for_quiet(bench.args.max_wait)
        m = bench.measure(round_no, variant, load)
        attempts += 1
        progress(tag + brief(m))
        m.monitor = m.monitor or best.monitor
        if disturbance(m.cpu) < disturbance(best.cpu):
            best = m
    best.attempts = attempts
    return best


def disturbance(cpu: dict[str, float]) -> tuple[float, float]:
    """Order attempts by how much others used the server's core, then the machine."""
    return (round(cpu.get("other_core0", 0.0), 2), cpu.get("other_all", 0.0))


def noisy(cpu: dict[str, float]) -> bool:
    return cpu.get("other_core0", 0.0) > NOISY_CORE0 or cpu.get("other_all", 0.0) > NOISY_ALL


def set_ratios(this_round: list[Measurement]) -> None:
    bare = {m.load: m for m in this_round if m.variant == "bare"}
    for m in this_round:
        base = bare.get(m.load)
        if base is not None and base.result.rps:
            m.ratio_to_bare = m.result.rps / base.result.rps
        if base is not None and base.cpu_us_per_request and m.cpu_us_per_request:
            m.cpu_ratio_to_bare = base.cpu_us_per_request / m.cpu_us_per_request


def brief(m: Measurement) -> str:
    r = m.result
    text = (
        f"{r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  statuses {r.statuses}"
    )
    if r.errors:
        text += f"  errors {r.errors}"
    if m.rss_bytes_per_key is not None:
        text += f"  rss {m.rss_bytes_per_key:.0f} B/key ({r.distinct_keys} keys)"
    if m.cpu:
        text += (
            f"  cpu: server {m.cpu['server_cores']:.2f}, others core0 "
            f"{m.cpu['other_core0']:.2f} all {m.cpu['other_all']:.2f}"
        )
    if m.server_log:
        text += f"  server log: {len(m.server_log)} lines"
    return text


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- summary ---------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        for load in LOADS:
            ms = [m for m in measurements if m.variant == variant.name and m.load == load]
            if ms:
                rows.append(summary_row(variant, load, ms, measurements))
    return rows


def summary_row(
    variant: Variant, load: LoadName, ms: Sequence[Measurement], all_ms: Sequence[Measurement]
) -> dict[str, Any]:
    attempts = sum(m.result.requests + sum(m.result.errors.values()) for m in ms)
    failed = sum(m.result.non2xx + sum(m.result.errors.values()) for m in ms)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for m in ms:
        statuses.update(m.result.statuses)
        errors.update(m.result.errors)
    row: dict[str, Any] = {
        "variant": variant.name,
        "load": load,
        "rate": ms[0].rate,
        "rounds": len(ms),
        "rps": median([m.result.rps for m in ms]),
        "p50_ms": median([m.result.p50_ms for m in ms]),
        "p99_ms": median([m.result.p99_ms for m in ms]),
        "ratio_to_bare": median([m.ratio_to_bare for m in ms]),
        "ratios": [m.ratio_to_bare for m in ms],
        "cpu_us_per_req": median([m.cpu_us_per_request for m in ms]),
        "cpu_ratio_to_bare": median([m.cpu_ratio_to_bare for m in ms]),
        "non2xx_share": failed / attempts if attempts else None,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "server_log": list(dict.fromkeys(line for m in ms for line in m.server_log)),
        "server_cores": median([m.cpu.get("server_cores") for m in ms]),
        "other_core0_per_round": [m.cpu.get("other_core0") for m in ms],
        "other_all_per_round": [m.cpu.get("other_all") for m in ms],
        "attempts_per_round": [m.attempts for m in ms],
    }
    if load == "random-key":
        row["distinct_keys"] = median([m.result.distinct_keys for m in ms])
        row["rss_bytes_per_key"] = median([m.rss_bytes_per_key for m in ms])
    if variant.backend == "redis":
        row.update(redis_summary(ms, all_ms))
    return row


def redis_summary(ms: Sequence[Measurement], all_ms: Sequence[Measurement]) -> dict[str, Any]:
    """Per request medians of Redis commands, by command and by context."""
    monitor = next((m.monitor for m in all_ms if m.monitor and m.variant == ms[0].variant), None)
    per_command: dict[str, float] = {}
    names = sorted({name for m in ms for name in m.redis_calls or {}})
    for name in names:
        per_command[name] = median([per_request(m, name) for m in ms]) or 0.0
    top_share = top_level_shares(monitor, names)
    reads = [m.redis_reads / m.result.requests for m in ms if m.redis_reads and m.result.requests]
    out: dict[str, Any] = {
        "redis_cmds_per_req": sum(per_command.values()),
        "redis_scripts_per_req": sum(v for k, v in per_command.items() if k in SCRIPT_COMMANDS),
        "redis_top_level_per_req": sum(v * top_share[k] for k, v in per_command.items()),
        "redis_reads_per_req": median(reads),
        "redis_per_command": per_command,
        "redis_in_lua": sorted(k for k, share in top_share.items() if share < 1),
        "redis_top_share": top_share,
        "redis_monitor_probe": monitor,
    }
    if ms[0].load == "random-key":
        out["redis_bytes_per_key"] = median([m.redis_bytes_per_key for m in ms])
        out["redis_keys_after"] = median([m.redis_keys_after for m in ms])
    return out


def per_request(m: Measurement, name: str) -> float | None:
    calls = m.redis_calls or {}
    return calls.get(name, 0) / m.result.requests if m.result.requests else None


def top_level_shares(
    monitor: dict[str, dict[str, int]] | None, names: Sequence[str]
) -> dict[str, float]:
    """Per command, the share sent at top level (1.0 unless the probe saw it inside Lua)."""
    shares: dict[str, float] = {}
    for name in names:
        base = name.split("|", 1)[0]
        top = (monitor or {}).get("top", {}).get(base, 0)
        lua = (monitor or {}).get("lua", {}).get(base, 0)
        shares[name] = top / (top + lua) if top + lua else 1.0
    return shares


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["variant"], r["load"]): r for r in rows}
    checks: list[dict[str, Any]] = []
    for variant, load, what, reference, target, op in REFERENCES:
        row = by_key.get((variant, load))
        slowapi = by_key.get((variant.replace("quotagate", "slowapi"), load))
        value = row.get(what) if row else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        checks.append(
            {
                "variant": variant,
                "load": load,
                "metric": what,
                "value": value,
                "target": f"{op} {target}",
                "met": met,
                "slowapi_now": slowapi.get(what) if slowapi else None,
                "slowapi_reference": reference,
            }
        )
    return checks


def problems(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What makes a row untrustworthy: failures, server log output, Redis not really used."""
    found: list[str] = []
    for r in rows:
        name = f"{r['variant']} {r['load']}"
        if r["non2xx_share"] is None or r["non2xx_share"] > 0.001:
            found.append(f"{name}: {fmt(r['non2xx_share'], '.2%')} not 2xx {r['statuses']}")
        if r["errors"]:
            found.append(f"{name}: load generator errors {r['errors']}")
        disturbed = [
            i + 1
            for i, (core0, every) in enumerate(
                zip(r["other_core0_per_round"], r["other_all_per_round"], strict=True)
            )
            if noisy({"other_core0": core0 or 0.0, "other_all": every or 0.0})
        ]
        if disturbed:
            found.append(
                f"{name}: other processes used CPU in round(s) {disturbed} (core 0: "
                f"{', '.join(fmt(x, '.2f') for x in r['other_core0_per_round'])}; all: "
                f"{', '.join(fmt(x, '.2f') for x in r['other_all_per_round'])} cores)"
            )
        if r["server_log"]:
            found.append(f"{name}: server wrote {len(r['server_log'])} log lines (below)")
        scripts = r.get("redis_scripts_per_req")
        if scripts is not None and scripts < 0.9:
            found.append(
                f"{name}: only {scripts:.2f} Redis script calls per request: the variant did "
                "not (always) use Redis (in-memory fallback?)"
            )
    return found


def source_digest() -> str:
    """SHA-256 over quotagate's source files, to tell whether it changed during the run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "quotagate").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# --- output ----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec's width."""
    if value is None:
        width = re.match(r"\d*", spec)
        return "-".rjust(int(width.group() or 0) if width else 0)
    return format(value, spec)


def render(
    rows: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]], notes: Sequence[str]
) -> str:
    lines = [
        f"{'variant':<17} {'load':<10} {'req/s':>8} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'non-2xx':>8} {'cpu us':>7} {'cpu x':>6} {'rss B/key':>9} {'cmds/req':>8} "
        f"{'top/req':>7} {'reads/req':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<17} {r['load']:<10} {fmt(r['rps'], '8.0f')} "
            f"{fmt(r['ratio_to_bare'], '7.2f')} {fmt(r['p50_ms'], '7.2f')} "
            f"{fmt(r['p99_ms'], '7.2f')} {fmt(r['non2xx_share'], '8.2%')} "
            f"{fmt(r['cpu_us_per_req'], '7.1f')} {fmt(r['cpu_ratio_to_bare'], '6.2f')} "
            f"{fmt(r.get('rss_bytes_per_key'), '9.0f')} "
            f"{fmt(r.get('redis_cmds_per_req'), '8.2f')} "
            f"{fmt(r.get('redis_top_level_per_req'), '7.2f')} "
            f"{fmt(r.get('redis_reads_per_req'), '9.2f')}"
        )
    lines += ["", "Per-round ratios to bare, statuses, errors, server log lines:"]
    for r in rows:
        ratios = ", ".join(fmt(x, ".2f") for x in r["ratios"])
        extra = f"  errors {r['errors']}" if r["errors"] else ""
        others = ", ".join(fmt(x, ".2f") for x in r["other_core0_per_round"])
        lines.append(
            f"  {r['variant']:<17} {r['load']:<10} [{ratios}]  {r['statuses']}{extra}"
            f"  server {fmt(r['server_cores'], '.2f')} core, others on core 0 [{others}]"
        )
        lines += [f"      log: {line}" for line in r["server_log"][:40]]
    redis_rows = [r for r in rows if "redis_per_command" in r]
    if redis_rows:
        lines += ["", "Redis per request (median over rounds; * = seen inside Lua by MONITOR):"]
    for r in redis_rows:
        cmds = ", ".join(
            f"{name}{'*' if name in r['redis_in_lua'] else ''} {v:.2f}"
            for name, v in sorted(r["redis_per_command"].items(), key=lambda kv: -kv[1])
            if v >= 0.005
        )
        lines.append(
            f"  {r['variant']:<17} {r['load']:<10} scripts {r['redis_scripts_per_req']:.2f}, "
            f"top-level {r['redis_top_level_per_req']:.2f}, total {r['redis_cmds_per_req']:.2f}: "
            f"{cmds}"
        )
        if "redis_bytes_per_key" in r:
            lines.append(
                f"  {'':<17} {'':<10} Redis used_memory {fmt(r['redis_bytes_per_key'], '.0f')} "
                f"B/key, {fmt(r['redis_keys_after'], '.0f')} keys held after the run"
            )
    lines += ["", "Targets (slowapi reference measured earlier; slowapi now from this run):"]
    for c in checks:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[c["met"]]
        lines.append(
            f"  {c['variant']:<17} {c['load']:<10} {c['metric']:<17} "
            f"{fmt(c['value'], '.2f'):>7}  target {c['target']:<8} {verdict:<6}  "
            f"slowapi now {fmt(c['slowapi_now'], '.2f')}, reference {c['slowapi_reference']}"
        )
    lines += [
        "",
        "cpu us = server CPU time per response; cpu x = bare's cpu us / this variant's, same "
        "round:",
        "the throughput ratio if both had core 0 to themselves and were CPU-bound (robust to "
        "other processes; blind to time spent waiting on Redis).",
    ]
    lines += ["", "Problems:" if notes else "Problems: none (all 2xx, no server log, Redis used)"]
    lines += [f"  ! {note}" for note in notes]
    random_rows = [r for r in rows if r["load"] == "random-key"]
    if random_rows:
        lines += [
            "",
            "rss B/key = (VmRSS after - before the measured wrk run) / distinct keys the wrk "
            f"script sent (median {fmt(median([r['distinct_keys'] for r in random_rows]), '.0f')}"
            f"); limit {random_rows[0]['rate']} for random keys, {rows[0]['rate']} for one key.",
        ]
    return "\n".join(lines)


def metadata(args: argparse.Namespace, redis_version: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "redis": redis_version,
        "packages": {
            name: version(name)
            for name in (
                "quotagate",
                "fastapi",
                "starlette",
                "uvicorn",
                "slowapi",
                "limits",
                "redis",
            )
        },
        "uvicorn_flags": " ".join(UVICORN_FLAGS),
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
        "connections": CONNECTIONS,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "redo_noisy": args.redo_noisy,
        "max_wait_for_quiet_s": args.max_wait,
        "noisy_if_other_cores": {"core0": NOISY_CORE0, "all": NOISY_ALL},
        "rate_one_key": args.rate,
        "rate_random_key": args.random_rate,
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variants interleaved (3)")
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS, help="warm-up seconds (1)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--rate", default="1000000/minute", help="limit for the one-key load")
    parser.add_argument("--random-rate", default="1000/day", help="limit for random keys")
    parser.add_argument(
        "--redo-noisy", type=int, default=2, help="re-measure a run disturbed by others (2x)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=180, help="seconds to wait for a quiet machine (180)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s, 1 round")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3, 1
    known = {v.name for v in VARIANTS}
    args.variant_list = [v for v in VARIANTS if v.name in args.variants.split(",")]
    unknown = set(args.variants.split(",")) - known
    args.load_list = [x for x in LOADS if x in args.loads.split(",")]
    if unknown or not args.variant_list:
        parser.error(f"--variants: pick from {', '.join(sorted(known))}")
    if set(args.loads.split(",")) - set(LOADS) or not args.load_list:
        parser.error(f"--loads: pick from {', '.join(LOADS)}")
    return args


def check_environment() -> None:
    missing = [tool for tool in ("hey", "wrk", "redis-server", "taskset") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing on PATH: {', '.join(missing)}")
    if not {SERVER_CORE, LOAD_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"needs cores {SERVER_CORE} and {LOAD_CORE}")


@contextmanager
def environment() -> Iterator[tuple[RedisServer, Path]]:
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        redis_server = start_redis(Path(tmp))
        try:
            yield redis_server, Path(tmp)
        finally:
            redis_server.client.close()
            redis_server.process.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Stop cleanly (every child by pid) on SIGTERM, and on Ctrl-C even when started with "&".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    check_environment()
    os.sched_setaffinity(0, {LOAD_CORE})  # keep the driver off the server's core
    digest_before = source_digest()
    with environment() as (redis_server, workdir):
        redis_version = str(redis_server.client.info("server")["redis_version"])
        bench = Bench(redis_server, workdir, args)
        measurements = run_rounds(bench, args.variant_list, args.load_list)
    rows = summarize(measurements)
    checks = check_targets(rows)
    notes = problems(rows)
    digest_after = source_digest()
    if digest_after != digest_before:
        notes.append(
            f"quotagate's source changed during the run ({digest_before} -> {digest_after})"
        )
    table = render(rows, checks, notes) + f"\nquotagate source digest: {digest_after}"
    if args.json:
        print(table, file=sys.stderr)
        doc = {
            "meta": {**metadata(args, redis_version), "quotagate_source": digest_after},
            "problems": notes,
            "summary": rows,
            "targets": checks,
            "measurements": [as_json(m) for m in measurements],
        }
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(table)
    return 0


def as_json(m: Measurement) -> dict[str, Any]:
    out = asdict(m)
    out["rss_bytes_per_key"] = m.rss_bytes_per_key
    out["cpu_us_per_request"] = m.cpu_us_per_request
    out["redis_bytes_per_key"] = m.redis_bytes_per_key
    out["result"]["non2xx"] = m.result.non2xx
    out["result"]["failed_share"] = m.result.failed_share
    return out


if __name__ == "__main__":
    sys.exit(main())

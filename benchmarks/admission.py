"""Fair, saturation-aware admission in front of a simulated GPU: who gets the tokens, and at what
cost in throughput and latency, against the FIFO gateway of before.

The model server is ``python -m quotagate mock --gpu`` (``gateway/backends/gpu.py``: continuous
batching over a KV cache, one token per request per step, vLLM's ``/metrics``), one fresh mock
per run, on a free loopback port. In front of it, one fresh ``python -m quotagate serve``
per run with one ``[[backends]]`` entry (``kind = "openai"``, the mock's URL, ``models =
["quotagate-mock"]``, ``queue_timeout_ms = 120000`` so that requests wait rather than 503) and
tiers whose request, token and concurrency limits no run comes near: only the backend's slots
(``max_concurrency``, or ``[backends.adaptive]``'s limit) and the simulated GPU are scarce.

Two gateways:

    ours      this checkout's ``src/`` (the venv's editable install): weighted fair queuing
              over clients within one priority, costed in tokens, and the adaptive limit
    fifo      "today's FIFO": commit ``a8e6d93`` (before fair queuing), its ``src/`` extracted
              with ``git archive`` into a temporary directory and run by the same python with
              ``PYTHONPATH`` on it (the script checks that ``quotagate.__file__`` is that
              copy's). Strict tier priority, first come first served within one priority, a
              fixed ``max_concurrency``; no ``weight``, ``max_queued`` or adaptive tables

The load is this script: closed-loop clients on raw asyncio HTTP/1.1 (keep-alive, no httpx:
this folder's ``http.py`` shadows the standard library's package, and raw reads cost the load
core less). Each client is one API key running N "streams", each sending one chat completion
after another with ``"stream": true, "stream_options": {"include_usage": true}``, a prompt of
an exact size (``"a a a ..."``: one token per word by ``gateway/tokens.py``, the count the mock
reports as ``prompt_tokens``) and an explicit ``max_tokens`` (the mock's ``--output-tokens`` is
above it, so every answer is exactly ``max_tokens`` long). Each streamed content event is one
generated token (the mock sends one event per token; every finished answer's count is checked
against its usage chunk's ``completion_tokens``).

What is counted: tokens GENERATED within the measured window (each content event by its
arrival time), after a warm-up that is not counted; a request's prompt tokens count when its
first token arrives (the step that admits it prefills it). A client's share is its generated
tokens over all clients'; the cost share (scenario ``cost``) is prompt + generated tokens, the
gateway's own cost unit. Time to first token (TTFT) is from writing the request to its first
content event; the gateway's ``x-quotagate-queue-ms`` says how much of it was spent waiting
for a slot (ours only). The clients' streams start interleaved in proportion (heavy, heavy,
light, heavy, ...), so that a FIFO queue is in its steady order from the start rather than
every stream of one client ahead of the other's (which takes a whole queue's wait, ~30 s in
fairness, to undo). During the window the mock's ``/metrics`` (``vllm:num_requests_waiting``,
``..._running``, ``vllm:kv_cache_usage_perc``, ``vllm:generation_tokens_total``) and the
gateway's ``/health`` (``in_flight``, ``queued``, the adaptive ``concurrency`` per replica)
are sampled every 250 ms. CPU: this script's own (the load), the gateway's and the mock's
(``/proc/PID/stat``), and each core's busy share (``/proc/stat``), over the window.

Scenarios (``--only NAME,...``; all by default):

    fairness  two keys of one tier, "heavy" with 10x the streams of "light", same request
              (prompt 200, max_tokens 100); fixed max_concurrency 16, so the slots are scarce
              and both keys always have requests queued (light's streams are above its share
              of the slots). Target: each key's share of the generated tokens within +-10% of
              its weighted share (50/50). FIFO gives heavy about its share of streams (~90%)
    weights   the same with light's tier weight 3 (two tiers of the same priority): light 75%;
              and the reverse (heavy's tier weight 3): heavy 75%. FIFO once for comparison
              (weights mean nothing to it: the same run as fairness's, reused when both run)
    cost      key "long" sending 20k-token prompts (8 streams), key "short" 200-token prompts
              (128 streams), the same max_tokens (16), equal weights, both backlogged (fixed
              max_concurrency 64). Target: shares of prompt + generated tokens (the cost
              unit) within +-10% of 50%; the generated-token shares and the request counts
              are printed beside them
    adaptive  one key, enough streams for 3x what the KV cache holds (3 x 100), answers of 50
              to 150 tokens (identical answers finish in lockstep, and their whole cohort's
              prompts then stall one step: real traffic is spread). A sweep of fixed
              max_concurrency WITHOUT adaptive (8 .. 256), then adaptive (max_concurrency 256,
              min_concurrency 2, metrics_url "auto", interval_ms 500) with target_waiting 0
              (the default) and 2. Per variant: generated tokens/s, the mock's waiting queue
              (median, p90), the adaptive limit (min/median/max). Targets: adaptive tokens/s at
              least 95% of the best fixed; the mock's median waiting at most 2
    ttft      a pro key (priority 10, 4 streams, max_tokens 16) alone (unloaded), then beside
              a free key (priority 1) flooding with 300 streams (3x overload, answers of 50 to
              150 tokens). Ours with adaptive vs FIFO with a fixed max_concurrency 256 (above
              what the KV holds, so the mock's own queue fills). Target (ours): flooded p99
              TTFT at most 2x the unloaded p99 (pro alone, through the same gateway); pro
              alone behind a fixed limit (the model server's own latency) is printed beside
              it. The p99 is also given for each half of the window. A closed loop bounds the
              mock's queue by the number of streams; so the same again with an OPEN-loop flood
              (100 new requests a second, 3x what the mock completes, whatever happens to
              them): FIFO behind a limit no queue reaches (4096) lets the mock's own queue grow
              for as long as the flood lasts, and pro waits behind all of it (the queue by
              quarter of the window, and pro's oldest request still waiting at its end); ours
              keeps pro's p99 within the same 2x

A share target "+-10%" is read as relative to the weighted share, for every key: a 25% share
must be 22.5-27.5%, its 75% peer 67.5-82.5% (the deviation is printed, so the other reading,
+-10 points, can be applied by eye).

The simulated GPU (printed with each scenario): ``--tokens-per-second 4000 --step-ms 20``,
``--output-tokens 1000`` (max_tokens decides every answer's length) and, per scenario,
``--kv-tokens 30000`` (100 requests of 300 tokens at once) with the default prefill (10 x
tokens/s) for fairness, weights, adaptive and ttft; for cost ``--kv-tokens 1500000`` (64 slots
x a 20k prompt and more: the KV cache never decides the order there, the gateway does) and
``--prefill-tokens-per-second 400000`` (at the default, each 20k prompt stalls the whole batch
for 0.5 s, so few are served in a window and each is a large lump of a share: the fair queue
is exact to about one request, and the share's resolution is one 20k prompt over the
window's total).

Method: gateway alone on core 0; the mock and this script (the load) on core 1 (``taskset``;
no pinning when it is missing or there is one core). Every server is started on a free
loopback port, waited for (the gateway until its replica is healthy), and stopped by its pid
(TERM, then KILL) in a finally block; every run is bounded in time.

Run:  .venv/bin/python benchmarks/admission.py [--quick] [--only fairness,weights,cost,adaptive,
          ttft] [--duration 15] [--warmup 5] [--no-baseline] [--json]

A full run takes about 7.5 minutes (19 runs of 5 s warm-up + 15 s window, plus start-up);
``--quick`` (4 s warm-up, 5 s windows, 3 sweep points) about 3. ``--json`` prints the results
on stdout (the tables then go to stderr). ``--no-baseline`` skips every FIFO run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway import (  # benchmarks/gateway.py: the same servers and raw HTTP/1.1
    Server,
    iter_body,
    read_head,
    terminate_as_interrupt,
)
from quotagate.testing import core_busy, process_cpu

ROOT = Path(__file__).resolve().parent.parent
STREAM_SEEDS = itertools.count()  # each stream draws its own answer lengths, repeatably
REQUEST_IDS = itertools.count()
BASELINE_COMMIT = "a8e6d93"  # the gateway before fair queuing: FIFO within one priority
GATEWAY_CORE = 0
LOAD_CORE = 1  # the mock and this script
LOOPBACK = "127.0.0.1"
MODEL = "quotagate-mock"
BACKEND = "gpu"
CHAT_PATH = "/v1/chat/completions"
SAMPLE_INTERVAL_S = 0.25
QUEUE_TIMEOUT_MS = 120_000
# Tier limits no run comes near: only the backend's slots and the GPU are scarce.
TIER_REQUESTS = "10000000/minute"
TIER_TOKENS = "1000000000000/minute"
TIER_CONCURRENCY = 100_000  # the open-loop flood holds thousands at once
# The chat format's overhead by gateway/tokens.py: 3 per message and 3 to prime the reply.
CHAT_OVERHEAD_TOKENS = 6
SHARE_TOLERANCE = 0.10  # relative to the weighted share
ADAPTIVE_TARGET_THROUGHPUT = 0.95  # of the best fixed max_concurrency
ADAPTIVE_TARGET_WAITING = 2  # the mock's median waiting queue
ADAPTIVE_TARGET_WAITINGS = (0, 2)  # [backends.adaptive] target_waiting: the default, and 2
TTFT_TARGET_RATIO = 2.0  # flooded p99 over unloaded p99
SWEEP = (8, 16, 32, 64, 96, 128, 192, 256)
QUICK_SWEEP = (32, 96, 256)
SCENARIOS = ("fairness", "weights", "cost", "adaptive", "ttft")


def log(message: str, out: TextIO) -> None:
    print(message, file=out, flush=True)


# --- what runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MockSpec:
    """The simulated GPU's flags."""

    kv_tokens: int
    tokens_per_second: float = 4000
    step_ms: float = 20
    output_tokens: int = 1000  # above every max_tokens here: max_tokens sets the length
    prefill_tokens_per_second: float | None = None  # None: the mock's (10 x tokens/s)

    def argv(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "quotagate",
            "mock",
            "--gpu",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            *self.flags(),
        ]

    def flags(self) -> list[str]:
        return [
            "--kv-tokens",
            str(self.kv_tokens),
            "--tokens-per-second",
            f"{self.tokens_per_second:g}",
            "--step-ms",
            f"{self.step_ms:g}",
            "--output-tokens",
            str(self.output_tokens),
            *(
                []
                if self.prefill_tokens_per_second is None
                else ["--prefill-tokens-per-second", f"{self.prefill_tokens_per_second:g}"]
            ),
        ]

    def describe(self) -> str:
        return "quotagate mock --gpu " + " ".join(self.flags())


@dataclass(frozen=True)
class Tier:
    name: str
    priority: int = 1
    weight: float = 1.0  # not written for the FIFO gateway, which has no weight


@dataclass(frozen=True)
class Client:
    """One API key's closed-loop load: ``streams`` requests in flight or queued at all times."""

    name: str
    tier: str
    streams: int
    prompt_tokens: int
    max_tokens: int
    spread: int = 0  # each request's max_tokens is drawn from max_tokens +- spread
    rate: float = 0.0  # > 0: open loop, this many new requests a second (``streams`` unused)

    @property
    def lengths(self) -> range:
        return range(self.max_tokens - self.spread, self.max_tokens + self.spread + 1)

    @property
    def key(self) -> str:
        return f"sk-bench-{self.name}-0123456789abcdef"

    @property
    def cost(self) -> int:
        """What the gateway charges a request (prompt estimate + reserved output)."""
        return self.prompt_tokens + self.max_tokens

    def request(self, port: int, max_tokens: int | None = None) -> bytes:
        words = self.prompt_tokens - CHAT_OVERHEAD_TOKENS  # one token each (gateway/tokens.py)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": " ".join(["a"] * words)}],
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payload = json.dumps(body).encode()
        head = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload


@dataclass(frozen=True)
class GatewaySpec:
    """One gateway configuration: its backend's slots, and ours or the FIFO baseline."""

    max_concurrency: int
    tiers: tuple[Tier, ...]
    adaptive: bool = False
    target_waiting: int = 0  # with adaptive
    fifo: bool = False  # the a8e6d93 gateway

    @property
    def label(self) -> str:
        name = "fifo" if self.fifo else "ours"
        limit = (
            f"adaptive<={self.max_concurrency}"
            if self.adaptive
            else f"fixed {self.max_concurrency}"
        )
        if self.adaptive and self.target_waiting:
            limit += f" target_waiting {self.target_waiting}"
        weights = [f"{t.name} x{t.weight:g}" for t in self.tiers if t.weight != 1 and not self.fifo]
        return " ".join([name, limit, *weights])


def gateway_config(spec: GatewaySpec, clients: Sequence[Client], mock_port: int) -> str:
    backend = f"""\
[[backends]]
name = "{BACKEND}"
kind = "openai"
urls = ["http://{LOOPBACK}:{mock_port}/v1"]
models = ["{MODEL}"]
max_concurrency = {spec.max_concurrency}
queue_timeout_ms = {QUEUE_TIMEOUT_MS}
health_interval_s = 5
"""
    if spec.adaptive:
        backend += f"""
[backends.adaptive]
min_concurrency = 2
metrics_url = "auto"
target_waiting = {spec.target_waiting}
interval_ms = 500
"""
    tiers = ""
    for tier in spec.tiers:
        tiers += f"""
[tiers.{tier.name}]
requests = "{TIER_REQUESTS}"
tokens = "{TIER_TOKENS}"
concurrency = {TIER_CONCURRENCY}
priority = {tier.priority}
"""
        if not spec.fifo:
            tiers += f"weight = {tier.weight:g}\n"
    keys = "".join(
        f'\n[[keys]]\nkey = "{c.key}"\ntier = "{c.tier}"\nname = "{c.name}"\n' for c in clients
    )
    return f"""\
log_level = "warning"

[server]
host = "{LOOPBACK}"

[storage]
url = "memory://"

[health]
requests = "{TIER_REQUESTS}"

{backend}{tiers}{keys}"""


# --- processes ---------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without anything that would change a server's setup behind our back."""
    dropped = ("QUOTAGATE_", "PYTHONPATH", "REDIS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra or {})
    return env


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuMark:
    wall: float
    load: float
    gateway: float
    mock: float
    busy: dict[int, float]


def cpu_mark(gateway: Server, mock: Server) -> CpuMark:
    return CpuMark(
        time.monotonic(), own_cpu(), process_cpu(gateway.pid), process_cpu(mock.pid), core_busy()
    )


def cpu_use(before: CpuMark, after: CpuMark) -> dict[str, float]:
    """Cores used between two marks: the load (this script), the gateway, the mock, each core."""
    wall = max(after.wall - before.wall, 1e-9)
    use = {
        "load": (after.load - before.load) / wall,
        "gateway": (after.gateway - before.gateway) / wall,
        "mock": (after.mock - before.mock) / wall,
    }
    for core in (GATEWAY_CORE, LOAD_CORE):
        if core in after.busy and core in before.busy:
            use[f"core{core}"] = (after.busy[core] - before.busy[core]) / wall
    return {k: round(v, 3) for k, v in use.items()}


def extract_baseline(workdir: Path, out: TextIO) -> dict[str, str]:
    """``src/`` of BASELINE_COMMIT under ``workdir``, and the environment that imports it."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", BASELINE_COMMIT, "src"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(workdir, filter="data")
    src = workdir / "src"
    env = child_env({"PYTHONPATH": str(src)})
    where = subprocess.run(
        [sys.executable, "-c", "import quotagate; print(quotagate.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"the FIFO baseline imports {where}, not the copy in {src}")
    log(f"FIFO baseline: commit {BASELINE_COMMIT}, quotagate imported from {where}", out)
    return env


# --- HTTP, raw asyncio -------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One GET on a connection of its own (2 s at most): the status and the body."""
    async with asyncio.timeout(2.0):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            status, headers = await read_head(reader)
            body = b"".join([chunk async for chunk in iter_body(reader, headers)])
        finally:
            writer.close()
    return status, body


def vllm_gauges(text: str) -> dict[str, float]:
    """``vllm:NAME`` -> value of every unlabelled-by-reason series in the mock's /metrics."""
    gauges: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and "finished_reason" not in line:
            name, _, value = line.rpartition(" ")
            gauges[name.split("{", 1)[0]] = float(value)
    return gauges


def health_backend(body: bytes) -> dict[str, Any]:
    backend: dict[str, Any] = json.loads(body)["backends"][BACKEND]
    return backend


# --- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class ClientStats:
    """What one client got in the window."""

    tokens: int = 0  # generated (content events) within the window
    prompt: int = 0  # prompt tokens of the requests whose first token came within the window
    admitted: int = 0  # requests whose first token came within the window
    finished: int = 0  # requests that ended within the window
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (first token at, ttft s)
    queue_ms: list[float] = field(default_factory=list)  # x-quotagate-queue-ms, admitted in window
    errors: Counter[str] = field(default_factory=Counter)
    usage_mismatch: int = 0  # answers whose events differ from their usage chunk
    pending: dict[int, float] = field(default_factory=dict)  # sent, no first token yet
    oldest_wait: float | None = None  # at the window's end: the longest a request had waited


async def one_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    client: Client,
    stats: ClientStats,
    window: Window,
) -> bool:
    """Send one streamed completion and read it to its end; whether the connection stays open."""
    sent = time.monotonic()
    ticket = next(REQUEST_IDS)
    stats.pending[ticket] = sent
    try:
        writer.write(request)
        return await read_answer(reader, sent, ticket, client, stats, window)
    finally:
        stats.pending.pop(ticket, None)


async def read_answer(
    reader: asyncio.StreamReader,
    sent: float,
    ticket: int,
    client: Client,
    stats: ClientStats,
    window: Window,
) -> bool:
    status, headers = await read_head(reader)
    keep = headers.get("connection", "").lower() != "close"
    if status != 200:
        async for _ in iter_body(reader, headers):
            pass
        stats.errors[str(status)] += 1
        await asyncio.sleep(0.05)  # a closed loop must not spin on refusals
        return keep
    if time.monotonic() in window and "x-quotagate-queue-ms" in headers:
        stats.queue_ms.append(float(headers["x-quotagate-queue-ms"]))
    events = 0
    usage: dict[str, int] | None = None
    buffer = b""
    async for chunk in iter_body(reader, headers):
        now = time.monotonic()
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        for event in complete:
            # The mock's content events carry one token each; the role event's content is "".
            at = event.find(b'"content":"')
            if at >= 0 and event[at + 11 : at + 12] != b'"':
                if events == 0:
                    stats.pending.pop(ticket, None)
                if events == 0 and now in window:
                    stats.admitted += 1
                    stats.prompt += client.prompt_tokens
                    stats.ttft.append((now, now - sent))
                events += 1
                if now in window:
                    stats.tokens += 1
            elif b'"usage":{' in event:
                usage = json.loads(event.removeprefix(b"data: "))["usage"]
    if time.monotonic() in window:
        stats.finished += 1
    if usage is None or usage["completion_tokens"] != events:
        stats.usage_mismatch += 1
    elif usage["prompt_tokens"] != client.prompt_tokens:
        stats.errors[f"prompt_tokens {usage['prompt_tokens']} != {client.prompt_tokens}"] += 1
    return keep


async def open_loop(port: int, client: Client, stats: ClientStats, window: Window) -> None:
    """Requests arriving at ``client.rate`` a second whatever happens to them (each on a
    connection of its own), until the window ends: a queue fed faster than it drains grows."""
    requests = [client.request(port, n) for n in client.lengths]
    draw = random.Random(f"{client.name}-open").choice
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError as exc:
            stats.errors[f"connect: {type(exc).__name__}"] += 1
            return
        try:
            await one_request(reader, writer, draw(requests), client, stats, window)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            stats.errors[type(exc).__name__] += 1
        finally:
            writer.close()

    started = time.monotonic()
    sent = 0
    try:
        while time.monotonic() < window.end:
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / client.rate - time.monotonic()))
    finally:
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def stream_loop(port: int, client: Client, stats: ClientStats, window: Window) -> None:
    """One closed-loop stream: a request, its answer to the end, the next request."""
    # Answers of one length finish in lockstep: the whole cohort's prompts then land in one
    # step and stall the batch. A spread of lengths is what real traffic has.
    requests = [client.request(port, n) for n in client.lengths]
    draw = random.Random(f"{client.name}-{next(STREAM_SEEDS)}").choice
    writer: asyncio.StreamWriter | None = None
    try:
        while True:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(LOOPBACK, port)
                except OSError as exc:
                    stats.errors[f"connect: {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.1)
                    continue
            try:
                request = draw(requests)
                keep = await one_request(reader, writer, request, client, stats, window)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                stats.errors[type(exc).__name__] += 1
                keep = False
                await asyncio.sleep(0.05)
            if not keep:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


@dataclass
class Samples:
    """The mock's gauges and the gateway's backend state, every SAMPLE_INTERVAL_S in the window."""

    waiting: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    kv: list[float] = field(default_factory=list)
    generated: list[tuple[float, float]] = field(default_factory=list)  # (at, generation total)
    limit: list[int] = field(default_factory=list)  # the adaptive limit (one replica)
    in_flight: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    failed: int = 0


async def sample(gateway_port: int, mock_port: int, window: Window, samples: Samples) -> None:
    while True:
        now = time.monotonic()
        if now >= window.end:
            return
        if now in window:
            try:
                _, metrics = await http_get(mock_port, "/metrics")
                _, health = await http_get(gateway_port, "/health")
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                samples.failed += 1
            else:
                gauges = vllm_gauges(metrics.decode())
                samples.waiting.append(gauges["vllm:num_requests_waiting"])
                samples.running.append(gauges["vllm:num_requests_running"])
                samples.kv.append(gauges["vllm:kv_cache_usage_perc"])
                samples.generated.append((now, gauges["vllm:generation_tokens_total"]))
                backend = health_backend(health)
                samples.in_flight.append(int(backend["in_flight"]))
                samples.queued.append(int(backend["queued"]))
                samples.limit.extend(int(v) for v in backend.get("concurrency", {}).values())
        await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - now)))


async def wait_healthy(gateway_port: int, within: float) -> None:
    """Until the gateway's replica is up (its first probe may precede the mock's readiness)."""

    async def healthy() -> bool:
        with contextlib.suppress(OSError, TimeoutError, ValueError, KeyError):
            status, body = await http_get(gateway_port, "/health")
            backend = health_backend(body)
            return status == 200 and backend["healthy"] == backend["replicas"]
        return False

    deadline = time.monotonic() + within
    while not await healthy():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway's replica was not healthy within {within:g} s")
        await asyncio.sleep(0.2)


@dataclass
class Run:
    """One gateway, one load, one window."""

    label: str
    window_s: float
    clients: dict[str, ClientStats]
    samples: Samples
    cpu: dict[str, float]
    streams: dict[str, int]  # client -> streams offered
    logs: dict[str, str] = field(default_factory=dict)  # server -> its log's tail, on errors

    def share(self, name: str) -> float:
        total = sum(s.tokens for s in self.clients.values())
        return self.clients[name].tokens / total if total else 0.0

    def cost_share(self, name: str) -> float:
        total = sum(s.tokens + s.prompt for s in self.clients.values())
        mine = self.clients[name]
        return (mine.tokens + mine.prompt) / total if total else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.clients.values()) / self.window_s

    @property
    def mock_tokens_per_s(self) -> float | None:
        """The mock's own count (vllm:generation_tokens_total) over the sampled span."""
        points = self.samples.generated
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def ttft(self, name: str, part: int | None = None, parts: int = 2) -> list[float]:
        """TTFT seconds of ``name``'s requests, all or in one ``part`` (0 first) of the window
        cut in ``parts`` by when their first token came."""
        records = self.clients[name].ttft
        if part is not None and records:
            start, end = records[0][0], records[-1][0]
            size = (end - start) / parts or 1.0
            records = [r for r in records if min(parts - 1, int((r[0] - start) / size)) == part]
        return [t for _, t in records]

    def notes(self) -> list[str]:
        found = []
        for name, stats in self.clients.items():
            if stats.errors:
                found.append(f"{self.label}: {name}: {dict(stats.errors)}")
            if stats.usage_mismatch:
                found.append(
                    f"{self.label}: {name}: {stats.usage_mismatch} answers whose content events "
                    "differ from their usage chunk's completion_tokens (or have none)"
                )
        if self.samples.failed:
            found.append(f"{self.label}: {self.samples.failed} samples failed")
        for name, tail in self.logs.items():
            found.append(f"{self.label}: {name}'s log ends:\n    " + tail.replace("\n", "\n    "))
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "window_s": self.window_s,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "mock_tokens_per_s": _round(self.mock_tokens_per_s),
            "clients": {
                name: {
                    "streams": self.streams[name],
                    "tokens": s.tokens,
                    "prompt_tokens": s.prompt,
                    "share": round(self.share(name), 4),
                    "cost_share": round(self.cost_share(name), 4),
                    "admitted": s.admitted,
                    "finished": s.finished,
                    "ttft_p50_ms": _ms(percentile(self.ttft(name), 50)),
                    "ttft_p99_ms": _ms(percentile(self.ttft(name), 99)),
                    "queue_ms_p50": _round(percentile(s.queue_ms, 50)),
                    "errors": dict(s.errors),
                    "usage_mismatch": s.usage_mismatch,
                }
                for name, s in self.clients.items()
            },
            "mock_waiting": spread(self.samples.waiting),
            "mock_running": spread(self.samples.running),
            "mock_kv_usage": spread(self.samples.kv),
            "gateway_in_flight": spread(self.samples.in_flight),
            "gateway_queued": spread(self.samples.queued),
            "adaptive_limit": spread(self.samples.limit),
            "cpu": self.cpu,
        }


async def drive(
    gateway: Server, mock: Server, clients: Sequence[Client], warmup: float, duration: float
) -> tuple[dict[str, ClientStats], Samples, dict[str, float]]:
    """The clients' streams for ``warmup`` + ``duration`` seconds; what the window saw."""
    await wait_healthy(gateway.port, 15.0)
    now = time.monotonic()
    window = Window(now + warmup, now + warmup + duration)
    stats = {c.name: ClientStats() for c in clients}
    samples = Samples()
    # The clients' streams start interleaved in proportion (heavy, heavy, light, heavy, ...):
    # a FIFO queue is then in its steady order from the start, not every stream of the first
    # client ahead of every stream of the second (which takes a whole queue's wait to undo).
    starts = sorted(
        ((i + 0.5) / c.streams, n) for n, c in enumerate(clients) for i in range(c.streams)
    )
    tasks = [
        asyncio.create_task(stream_loop(gateway.port, clients[n], stats[clients[n].name], window))
        for _, n in starts
        if not clients[n].rate
    ]
    tasks += [
        asyncio.create_task(open_loop(gateway.port, c, stats[c.name], window))
        for c in clients
        if c.rate
    ]
    sampler = asyncio.create_task(sample(gateway.port, mock.port, window, samples))
    try:
        await asyncio.sleep(warmup)
        before = cpu_mark(gateway, mock)
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
        after = cpu_mark(gateway, mock)
        end = time.monotonic()
        for client_stats in stats.values():
            if client_stats.pending:
                client_stats.oldest_wait = end - min(client_stats.pending.values())
        async with asyncio.timeout(10):
            await sampler
    finally:
        for task in [*tasks, sampler]:
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    for task in tasks:  # a stream that died of something unforeseen is a broken run
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"a stream failed: {task.exception()!r}")
    return stats, samples, cpu_use(before, after)


@dataclass
class Bench:
    """What every run shares: flags, pinning, the work directory, the baseline's environment."""

    args: argparse.Namespace
    out: TextIO
    workdir: Path
    pin: bool
    fifo_env: dict[str, str] | None = None
    runs: int = 0

    def core(self, core: int) -> int | None:
        return core if self.pin else None

    def run(self, mock_spec: MockSpec, spec: GatewaySpec, clients: Sequence[Client]) -> Run:
        """A fresh mock and gateway, the load, then both stopped (by pid) whatever happens."""
        self.runs += 1
        tag = f"run{self.runs}"
        config = self.workdir / f"{tag}.toml"
        env = child_env()
        gateway_env = self.fifo_env if spec.fifo else env
        if gateway_env is None:
            raise RuntimeError("the FIFO baseline was not extracted")
        mock = Server(
            f"{tag}-mock",
            mock_spec.argv,
            "/metrics",
            self.core(LOAD_CORE),
            self.workdir / f"{tag}-mock.log",
            self.workdir,
            env,
        )
        servers = [mock]  # stopped in reverse
        try:
            mock.start()
            config.write_text(gateway_config(spec, clients, mock.port))
            gateway = Server(
                f"{tag}-gateway",
                functools.partial(gateway_argv, config),
                "/health",
                self.core(GATEWAY_CORE),
                self.workdir / f"{tag}-gateway.log",
                self.workdir,
                gateway_env,
            )
            servers.append(gateway)
            gateway.start()
            offered = ", ".join(f"{c.name} {c.streams}" for c in clients)
            log(f"  {spec.label}: streams {offered} ...", self.out)
            coroutine = drive(gateway, mock, clients, self.args.warmup, self.args.duration)
            stats, samples, cpu = asyncio.run(coroutine)
            for server in servers:
                if not server.alive():
                    raise RuntimeError(f"{server.name} exited: {server.log_tail(10)}")
            failed = any(c.errors or c.usage_mismatch for c in stats.values())
            logs = {server.name: server.log_tail(15) for server in servers} if failed else {}
        except Exception:
            for server in servers:
                log(f"{server.name} log:\n{server.log_tail(15)}", self.out)
            raise
        finally:
            for server in reversed(servers):
                server.stop()
        streams = {c.name: c.streams for c in clients}
        run = Run(spec.label, self.args.duration, stats, samples, cpu, streams, logs)
        log(f"    {run_line(run)}", self.out)
        return run


def gateway_argv(config: Path, port: int) -> list[str]:
    argv = [sys.executable, "-m", "quotagate", "serve", "--config", str(config)]
    return [*argv, "--host", LOOPBACK, "--port", str(port), "--log-level", "warning"]


# --- figures -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "min": _round(min(values) if values else None),
        "p50": _round(percentile(values, 50)),
        "p90": _round(percentile(values, 90)),
        "max": _round(max(values) if values else None),
        "n": len(values),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def run_line(run: Run) -> str:
    shares = "  ".join(f"{n} {run.share(n):.1%}" for n in run.clients)
    cpu = " ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    waiting = spread(run.samples.waiting)
    return (
        f"{run.tokens_per_s:,.0f} tok/s  {shares}  mock waiting p50 {_fmt(waiting['p50'])}  "
        f"cpu (cores) {cpu}"
    )


@dataclass(frozen=True)
class Check:
    what: str
    measured: str
    target: str
    ok: bool

    def line(self) -> str:
        verdict = "PASS" if self.ok else "MISS"
        return f"  {verdict}  {self.what}: {self.measured} (target {self.target})"


def share_check(what: str, share: float, target: float) -> Check:
    low, high = target * (1 - SHARE_TOLERANCE), target * (1 + SHARE_TOLERANCE)
    deviation = share / target - 1
    return Check(
        what,
        f"{share:.1%} ({deviation:+.1%} of its share)",
        f"{target:.0%} +-10%: {low:.1%}-{high:.1%}",
        low <= share <= high,
    )


@dataclass
class Scenario:
    name: str
    title: str
    mock: MockSpec
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)

    def render(self) -> str:
        head = [f"== {self.name}: {self.title}", f"   model server: {self.mock.describe()}"]
        return "\n".join([*head, *self.lines, *(c.line() for c in self.checks)])

    def report(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "mock": asdict(self.mock),
            "runs": {k: r.summary() for k, r in self.runs.items()},
            "checks": [asdict(c) for c in self.checks],
            "notes": [n for r in self.runs.values() for n in r.notes()],
        }


def cpu_text(run: Run) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())


def share_table(scenario: Scenario, slots: int, weights: dict[str, dict[str, float]]) -> None:
    """Rows per run and client: offered streams, its share of the slots, tokens, share."""
    scenario.lines.append(
        f"   {'run':<28} {'client':<6} {'streams':>7} {'fair slots':>10} {'tokens':>8} "
        f"{'share':>6} {'target':>6} {'admitted':>8} {'queue p50 ms':>12}"
    )
    for label, run in scenario.runs.items():
        run_weights = weights.get(label, {})
        total_weight = sum(run_weights.values())
        for name, stats in run.clients.items():
            target = run_weights[name] / total_weight if run_weights else None
            fair = f"{slots * target:.1f}" if target is not None else "-"
            target_text = f"{target:.0%}" if target is not None else "fifo"
            scenario.lines.append(
                f"   {label:<28} {name:<6} {run.streams[name]:>7} {fair:>10} "
                f"{stats.tokens:>8} {run.share(name):>6.1%} {target_text:>6} {stats.admitted:>8} "
                f"{_fmt(percentile(stats.queue_ms, 50)):>12}"
            )
    for label, run in scenario.runs.items():
        scenario.lines.append(
            f"   {label}: {run.tokens_per_s:,.0f} generated tok/s; cpu (cores) {cpu_text(run)}"
        )


# --- the scenarios -----------------------------------------------------------------------------

FAIR_MOCK = MockSpec(kv_tokens=30_000)  # 100 requests of 200 + 100 tokens at once
FAIR_SLOTS = 16
LIGHT_STREAMS = 24  # above 75% of FAIR_SLOTS: light is backlogged at every weight here
HEAVY_STREAMS = 10 * LIGHT_STREAMS


def fair_clients(light_tier: str, heavy_tier: str) -> list[Client]:
    return [
        Client("heavy", heavy_tier, HEAVY_STREAMS, prompt_tokens=200, max_tokens=100),
        Client("light", light_tier, LIGHT_STREAMS, prompt_tokens=200, max_tokens=100),
    ]


def fifo_fairness(bench: Bench, cache: dict[str, Run]) -> Run | None:
    """The FIFO gateway under the fairness load (one tier): run once, reused by weights."""
    if bench.args.no_baseline:
        return None
    if "fifo" not in cache:
        clients = fair_clients("free", "free")
        spec = GatewaySpec(FAIR_SLOTS, (Tier("free"),), fifo=True)
        cache["fifo"] = bench.run(FAIR_MOCK, spec, clients)
    return cache["fifo"]


def scenario_fairness(bench: Bench, cache: dict[str, Run]) -> Scenario:
    scenario = Scenario(
        "fairness",
        f"heavy {HEAVY_STREAMS} streams vs light {LIGHT_STREAMS}, one tier, "
        f"max_concurrency {FAIR_SLOTS} (prompt 200, max_tokens 100)",
        FAIR_MOCK,
    )
    clients = fair_clients("free", "free")
    spec = GatewaySpec(FAIR_SLOTS, (Tier("free"),))
    scenario.runs["ours"] = bench.run(FAIR_MOCK, spec, clients)
    fifo = fifo_fairness(bench, cache)
    if fifo is not None:
        scenario.runs["fifo"] = fifo
    share_table(scenario, FAIR_SLOTS, {"ours": {"heavy": 1, "light": 1}})
    ours = scenario.runs["ours"]
    for name in ("light", "heavy"):
        scenario.checks.append(share_check(f"ours, {name}'s token share", ours.share(name), 0.5))
    if fifo is not None:
        scenario.lines.append(
            f"   fifo: heavy gets {fifo.share('heavy'):.1%} (its share of the streams: "
            f"{HEAVY_STREAMS / (HEAVY_STREAMS + LIGHT_STREAMS):.1%})"
        )
    return scenario


def scenario_weights(bench: Bench, cache: dict[str, Run]) -> Scenario:
    scenario = Scenario(
        "weights",
        f"the fairness load, light and heavy in two tiers of one priority, weights 3:1 and "
        f"1:3, max_concurrency {FAIR_SLOTS}",
        FAIR_MOCK,
    )
    clients = fair_clients("light", "heavy")
    weights: dict[str, dict[str, float]] = {}
    for label, light_weight, heavy_weight in (("light x3", 3, 1), ("heavy x3", 1, 3)):
        tiers = (Tier("light", weight=light_weight), Tier("heavy", weight=heavy_weight))
        run = bench.run(FAIR_MOCK, GatewaySpec(FAIR_SLOTS, tiers), clients)
        scenario.runs[f"ours {label}"] = run
        weights[f"ours {label}"] = {"light": light_weight, "heavy": heavy_weight}
        total = light_weight + heavy_weight
        for name, weight in (("light", light_weight), ("heavy", heavy_weight)):
            scenario.checks.append(
                share_check(f"ours {label}, {name}'s token share", run.share(name), weight / total)
            )
    fifo = fifo_fairness(bench, cache)
    if fifo is not None:
        scenario.runs["fifo (no weights)"] = fifo
    share_table(scenario, FAIR_SLOTS, weights)
    return scenario


# 64 x (20000 + 16) and more; a prefill fast enough that many 20k prompts fit a window (see the
# module docstring).
COST_MOCK = MockSpec(kv_tokens=1_500_000, prefill_tokens_per_second=400_000)
COST_SLOTS = 64
COST_MAX_TOKENS = 16  # short answers: many requests served, so many 20k prompts in a window


def scenario_cost(bench: Bench, cache: dict[str, Run]) -> Scenario:
    clients = [
        Client("long", "free", 8, prompt_tokens=20_000, max_tokens=COST_MAX_TOKENS),
        Client("short", "free", 2 * COST_SLOTS, prompt_tokens=200, max_tokens=COST_MAX_TOKENS),
    ]
    scenario = Scenario(
        "cost",
        f"long (20k-token prompts, {clients[0].streams} streams) vs short (200-token prompts, "
        f"{clients[1].streams} streams), max_tokens {COST_MAX_TOKENS}, one tier, "
        f"max_concurrency {COST_SLOTS}",
        COST_MOCK,
    )
    run = bench.run(COST_MOCK, GatewaySpec(COST_SLOTS, (Tier("free"),)), clients)
    scenario.runs["ours"] = run
    scenario.lines.append(
        f"   {'client':<6} {'streams':>7} {'prompt':>9} {'generated':>9} {'cost share':>10} "
        f"{'gen share':>9} {'admitted':>8} {'finished':>8} {'queue p50 ms':>12}"
    )
    for c in clients:
        s = run.clients[c.name]
        scenario.lines.append(
            f"   {c.name:<6} {c.streams:>7} {s.prompt:>9} {s.tokens:>9} "
            f"{run.cost_share(c.name):>10.1%} {run.share(c.name):>9.1%} {s.admitted:>8} "
            f"{s.finished:>8} {_fmt(percentile(s.queue_ms, 50)):>12}"
        )
    scenario.lines.append(
        f"   {run.tokens_per_s:,.0f} generated tok/s; cpu (cores) {cpu_text(run)}"
    )
    for c in clients:
        scenario.checks.append(
            share_check(
                f"{c.name}'s share of prompt + generated tokens", run.cost_share(c.name), 0.5
            )
        )
    return scenario


ADAPTIVE_MOCK = FAIR_MOCK  # the KV cache holds 100 requests of 300 tokens
OVERLOAD_STREAMS = 300  # 3 x what the KV cache holds
ADAPTIVE_MAX = 256
# 3x overload: answers of 50 to 150 tokens (100 on average), so the batch turns over steadily.
FLOOD = Client("flood", "free", OVERLOAD_STREAMS, prompt_tokens=200, max_tokens=100, spread=50)


def limit_text(limits: Sequence[int]) -> str:
    """The adaptive limit's min/median/max over the window ("-" without adaptive)."""
    if not limits:
        return "-"
    return f"{min(limits)}/{_fmt(percentile(limits, 50))}/{max(limits)}"


def adaptive_line(label: str, run: Run) -> str:
    waiting = spread(run.samples.waiting)
    running = spread(run.samples.running)
    in_flight = spread(run.samples.in_flight)
    return (
        f"   {label:<22} {run.tokens_per_s:>8,.0f} {_fmt(run.mock_tokens_per_s):>8} "
        f"{_fmt(waiting['p50']) + '/' + _fmt(waiting['p90']):>11} {_fmt(running['p50']):>7} "
        f"{_fmt(in_flight['p50']):>9} "
        f"{limit_text(run.samples.limit):>17} {_fmt(_ms(percentile(run.ttft('flood'), 99))):>9}  "
        f"{cpu_text(run)}"
    )


def scenario_adaptive(bench: Bench, cache: dict[str, Run]) -> Scenario:
    clients = [FLOOD]
    sweep = QUICK_SWEEP if bench.args.quick else SWEEP
    scenario = Scenario(
        "adaptive",
        f"{OVERLOAD_STREAMS} streams (3x the 100 the KV cache holds), prompt 200, max_tokens "
        f"50-150: fixed max_concurrency {', '.join(map(str, sweep))}, then adaptive "
        f"(max {ADAPTIVE_MAX}, min 2, interval 500 ms) with target_waiting 0 (the default) "
        "and 2",
        ADAPTIVE_MOCK,
    )
    tiers = (Tier("free"),)
    for limit in sweep:
        run = bench.run(ADAPTIVE_MOCK, GatewaySpec(limit, tiers), clients)
        scenario.runs[f"fixed {limit}"] = run
    for waiting in ADAPTIVE_TARGET_WAITINGS:
        spec = GatewaySpec(ADAPTIVE_MAX, tiers, adaptive=True, target_waiting=waiting)
        scenario.runs[f"adaptive, waiting {waiting}"] = bench.run(ADAPTIVE_MOCK, spec, clients)
    scenario.lines.append(
        f"   {'variant':<22} {'tok/s':>8} {'mock t/s':>8} {'waiting p50/p90':>11} "
        f"{'running':>7} {'in flight':>9} {'limit min/p50/max':>17} {'p99 ttft':>9}  cpu (cores)"
    )
    for label, run in scenario.runs.items():
        scenario.lines.append(adaptive_line(label, run))
    best_label, best = max(
        ((k, r) for k, r in scenario.runs.items() if k.startswith("fixed")),
        key=lambda kr: kr[1].tokens_per_s,
    )
    for label, adaptive in scenario.runs.items():
        if not label.startswith("adaptive"):
            continue
        ratio = adaptive.tokens_per_s / best.tokens_per_s if best.tokens_per_s else 0.0
        scenario.checks.append(
            Check(
                f"{label}: tokens/s over the best fixed",
                f"{adaptive.tokens_per_s:,.0f} / {best.tokens_per_s:,.0f} ({best_label}) = "
                f"{ratio:.1%}",
                f">= {ADAPTIVE_TARGET_THROUGHPUT:.0%}",
                ratio >= ADAPTIVE_TARGET_THROUGHPUT,
            )
        )
        median_waiting = percentile(adaptive.samples.waiting, 50)
        scenario.checks.append(
            Check(
                f"{label}: the mock's median waiting queue",
                _fmt(median_waiting, ".1f"),
                f"<= {ADAPTIVE_TARGET_WAITING}",
                median_waiting is not None and median_waiting <= ADAPTIVE_TARGET_WAITING,
            )
        )
        if adaptive.samples.limit:
            trajectory = adaptive.samples.limit[:: max(1, len(adaptive.samples.limit) // 20)]
            scenario.lines.append(f"   {label}: the limit over the window: {trajectory}")
    return scenario


TTFT_TIERS = (Tier("free", priority=1), Tier("pro", priority=10))
PRO = Client("pro", "pro", 4, prompt_tokens=200, max_tokens=16)  # short: many TTFT samples
FREE_FLOOD = FLOOD
FIFO_TTFT_SLOTS = 256  # above the 100 the KV cache holds: the mock's own queue fills
# Open loop: 3x the ~33 answers a second the mock completes, whatever happens to them; in front
# of it a limit no queue reaches, so the mock's own queue grows for as long as the flood lasts.
OPEN_FLOOD = Client("flood", "free", 0, prompt_tokens=200, max_tokens=100, spread=50, rate=100.0)
OPEN_SLOTS = 4096


def queue_text(queue_ms: Sequence[float]) -> str:
    if not queue_ms:
        return "-"
    return f"{_fmt(percentile(queue_ms, 50))}/{_fmt(percentile(queue_ms, 99))}"


def ttft_line(label: str, run: Run) -> str:
    return (
        f"   {label:<22} {_fmt(_ms(percentile(run.ttft('pro'), 50))):>8} "
        f"{_fmt(_ms(percentile(run.ttft('pro'), 99))):>8} "
        f"{_fmt(_ms(percentile(run.ttft('pro', 0), 99))):>12} "
        f"{_fmt(_ms(percentile(run.ttft('pro', 1), 99))):>12} "
        f"{len(run.ttft('pro')):>6} {queue_text(run.clients['pro'].queue_ms):>16} "
        f"{run.tokens_per_s:>7,.0f} {_fmt(spread(run.samples.waiting)['p50']):>11} "
        f"{_fmt(spread(run.samples.in_flight)['p50']):>13} "
        f"{limit_text(run.samples.limit):>17}"
    )


def p99_ratio(loaded: Run, unloaded: Run) -> tuple[str, float | None]:
    """Pro's flooded p99 TTFT over its unloaded p99: the text and the ratio."""
    base = percentile(unloaded.ttft("pro"), 99)
    high = percentile(loaded.ttft("pro"), 99)
    ratio = high / base if base and high is not None else None
    return f"{_fmt(_ms(high))} / {_fmt(_ms(base))} ms = {_fmt(ratio, '.2f')}x", ratio


def scenario_ttft(bench: Bench, cache: dict[str, Run]) -> Scenario:
    scenario = Scenario(
        "ttft",
        f"pro ({PRO.streams} streams, priority 10, max_tokens {PRO.max_tokens}) alone, then "
        f"beside a free flood ({FREE_FLOOD.streams} streams, priority 1, max_tokens "
        f"{min(FREE_FLOOD.lengths)}-{max(FREE_FLOOD.lengths)}); ours adaptive "
        f"(max {ADAPTIVE_MAX}) vs fifo fixed "
        f"{FIFO_TTFT_SLOTS}",
        ADAPTIVE_MOCK,
    )
    adaptive = GatewaySpec(ADAPTIVE_MAX, TTFT_TIERS, adaptive=True)
    # The unloaded reference: pro alone through the same adaptive gateway; pro alone behind a
    # fixed limit (the model server's own latency, nothing queued) is measured beside it.
    plan = [
        ("ours fixed unloaded", GatewaySpec(FIFO_TTFT_SLOTS, TTFT_TIERS), [PRO]),
        ("ours adaptive unloaded", adaptive, [PRO]),
        ("ours adaptive flooded", adaptive, [PRO, FREE_FLOOD]),
    ]
    if not bench.args.no_baseline:
        fifo = GatewaySpec(FIFO_TTFT_SLOTS, TTFT_TIERS, fifo=True)
        plan += [("fifo unloaded", fifo, [PRO]), ("fifo flooded", fifo, [PRO, FREE_FLOOD])]
        open_fifo = GatewaySpec(OPEN_SLOTS, TTFT_TIERS, fifo=True)
        plan += [("fifo open-loop flood", open_fifo, [PRO, OPEN_FLOOD])]
    plan += [("ours open-loop flood", adaptive, [PRO, OPEN_FLOOD])]
    for label, spec, clients in plan:
        scenario.runs[label] = bench.run(ADAPTIVE_MOCK, spec, clients)
    scenario.lines.append(
        f"   {'run':<22} {'pro p50':>8} {'pro p99':>8} {'p99 1st half':>12} {'p99 2nd half':>12} "
        f"{'pro n':>6} {'gw queue p50/p99':>16} {'tok/s':>7} {'waiting p50':>11} "
        f"{'in flight p50':>13} {'limit min/p50/max':>17}  (ms; gw queue: x-quotagate-queue-ms)"
    )
    for label, run in scenario.runs.items():
        scenario.lines.append(ttft_line(label, run))
    runs = scenario.runs
    for label in ("ours adaptive unloaded", "ours adaptive flooded"):
        limits = runs[label].samples.limit
        if limits:
            trajectory = limits[:: max(1, len(limits) // 20)]
            scenario.lines.append(f"   {label}: the limit over the window: {trajectory}")
    measured, ratio = p99_ratio(runs["ours adaptive flooded"], runs["ours adaptive unloaded"])
    scenario.checks.append(
        Check(
            "ours: pro p99 TTFT flooded over unloaded (adaptive both)",
            measured,
            f"<= {TTFT_TARGET_RATIO:g}x",
            ratio is not None and ratio <= TTFT_TARGET_RATIO,
        )
    )
    measured, _ = p99_ratio(runs["ours adaptive flooded"], runs["ours fixed unloaded"])
    scenario.lines.append(f"   ours, over pro alone behind a fixed limit: {measured}")
    if "fifo flooded" in runs:
        measured, _ = p99_ratio(runs["fifo flooded"], runs["fifo unloaded"])
        scenario.lines.append(f"   fifo, flooded over unloaded: {measured}")
        for label in ("fifo open-loop flood", "ours open-loop flood"):
            opened = runs[label]
            waiting = opened.samples.waiting
            size = max(1, len(waiting) // 4)
            quarters = [percentile(waiting[i * size : (i + 1) * size], 50) for i in range(4)]
            oldest = opened.clients["pro"].oldest_wait
            scenario.lines.append(
                f"   {label} ({OPEN_FLOOD.rate:g} requests/s): the mock's waiting queue by "
                f"quarter of the window {', '.join(_fmt(q) for q in quarters)}; pro: "
                f"{len(opened.ttft('pro'))} first tokens in the window, its oldest request "
                f"waiting at the end {_fmt(oldest, '.1f') if oldest is not None else '-'} s"
            )
    measured, ratio = p99_ratio(runs["ours open-loop flood"], runs["ours adaptive unloaded"])
    scenario.checks.append(
        Check(
            "ours: pro p99 TTFT under the open-loop flood over unloaded",
            measured,
            f"<= {TTFT_TARGET_RATIO:g}x",
            ratio is not None and ratio <= TTFT_TARGET_RATIO,
        )
    )
    return scenario


RUNNERS: dict[str, Callable[[Bench, dict[str, Run]], Scenario]] = {
    "fairness": scenario_fairness,
    "weights": scenario_weights,
    "cost": scenario_cost,
    "adaptive": scenario_adaptive,
    "ttft": scenario_ttft,
}


# --- main --------------------------------------------------------------------------------------


def source_state() -> dict[str, Any]:
    """The commit the gateway under test is at, and its files in src/ changed since."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=30
        )
        return done.stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "src_changed": changed}


def run(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})  # the load beside the mock
    else:
        log("not pinned (no taskset, or one core): the gateway shares cores with the load", out)
    source = source_state()
    changed = ", ".join(source["src_changed"]) or "none"
    log(f"ours: src/ at {source['commit']}, uncommitted changes in src/: {changed}", out)
    workdir = Path(tempfile.mkdtemp(prefix="admission-bench-"))
    started = time.monotonic()
    scenarios: list[Scenario] = []
    try:
        bench = Bench(args, out, workdir, pin)
        wants_fifo = {"fairness", "weights", "ttft"} & set(args.only)
        if wants_fifo and not args.no_baseline:
            bench.fifo_env = extract_baseline(workdir / "baseline", out)
        cache: dict[str, Run] = {}
        for name in SCENARIOS:
            if name in args.only:
                log(f"{name}:", out)
                scenario = RUNNERS[name](bench, cache)
                scenarios.append(scenario)
                log(scenario.render(), out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    return {
        "setup": {
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "pinned": pin,
            "ours": source,
            "baseline_commit": None if args.no_baseline else BASELINE_COMMIT,
            "elapsed_s": round(elapsed, 1),
            "loadavg_end": tuple(round(x, 2) for x in os.getloadavg()),
        },
        "scenarios": {s.name: s.report() for s in scenarios},
        "text": [s.render() for s in scenarios],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fair, saturation-aware admission vs FIFO, in front of quotagate mock --gpu."
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 s warm-up, 5 s windows, 3 sweep points"
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 15)")
    parser.add_argument("--warmup", type=float, help="seconds not measured before (default 5)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FIFO gateway's runs")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, tables on stderr")
    args = parser.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (4.0 if args.quick else 5.0)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; expected some of {list(SCENARIOS)}")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The open-loop flood holds a connection per request waiting (servers inherit the limit).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = sys.stderr if args.json else sys.stdout
    try:
        with terminate_as_interrupt():
            report = run(args, out)
    except RuntimeError as exc:
        print(f"admission benchmark failed: {exc}", file=sys.stderr)
        return 1
    notes = [n for s in report["scenarios"].values() for n in s["notes"]]
    log("\nsummary:", out)
    for scenario in report["scenarios"].values():
        for check in scenario["checks"]:
            verdict = "PASS" if check["ok"] else "MISS"
            log(f"  {verdict}  {check['what']}: {check['measured']}", out)
    if notes:
        log("\nnotes:\n" + "\n".join(f"  {n}" for n in notes), out)
    log(f"\n{report['setup']['elapsed_s']:.0f} s in all", out)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reliability suite's tools: gateways as real processes from TOML text, a 3-master Redis
Cluster on loopback, process memory from /proc, bounded loads that measure latencies, and the
figures each test reports (printed in the terminal summary; RELIABILITY.md quotes them).

Every server here is a real process on 127.0.0.1, stopped by its process id; every load has a
count and a deadline and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from helpers import error_code, error_of, metric_samples, sample
from quotagate.testing import wait_until
from support import QuotagateProcess, RedisServer

__all__ = [
    "KEY_FREE",
    "KEY_LIMITED",
    "KEY_PRO",
    "KEY_STREAM",
    "KEY_TEAM",
    "KEY_TOKENS",
    "Gateway",
    "LoadResult",
    "RawAnswer",
    "RedisCluster",
    "check_request_burst",
    "completion_burst",
    "config_text",
    "gateways",
    "http_client",
    "metrics_of",
    "percentile",
    "proc_kib",
    "ratelimit_of",
    "raw_burst",
    "read_answers",
    "render",
    "run_load",
    "sample",
    "warm",
]

#: Keys every reliability config knows (plain keys: development style).
KEY_LIMITED = "sk-rel-limited-0001"
KEY_TOKENS = "sk-rel-tokens-0002"
KEY_PRO = "sk-rel-pro-0003"
KEY_FREE = "sk-rel-free-0004"
KEY_STREAM = "sk-rel-stream-0005"
KEY_TEAM = "sk-rel-team-0006"


def config_text(
    tiers: str,
    *,
    storage_url: str = "memory://",
    fallback: str = "memory",
    timeout_ms: int = 100,
    prefix: str = "qg",
    backend: str = 'kind = "mock"',
    max_concurrency: int = 256,
    queue_timeout_ms: int = 2000,
    server: str = "",
    anonymous: str | None = None,
) -> str:
    """A gateway config: ``tiers`` and ``[[keys]]`` tables as TOML, the rest filled in."""
    anonymous_table = f'[anonymous]\ntier = "{anonymous}"\n' if anonymous else ""
    return f"""
log_level = "info"

[server]
{server}

[storage]
url = "{storage_url}"
fallback = "{fallback}"
timeout_ms = {timeout_ms}
prefix = "{prefix}"

[backend]
{backend}
max_concurrency = {max_concurrency}
queue_timeout_ms = {queue_timeout_ms}

[health]
requests = "100000/minute"

{anonymous_table}
{tiers}
"""


class Gateway(QuotagateProcess):
    """``python -m quotagate serve --config FILE`` on a free loopback port, its config and log
    in ``directory``; no QUOTAGATE_* variable of the caller's shell changes the tested config."""

    def __init__(self, config: str, directory: Path, *, name: str = "gateway") -> None:
        path = directory / f"{name}.toml"
        path.write_text(config, "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
        super().__init__(
            "serve", "--config", str(path), "--port", "{port}", name=name, env=env,
            log=directory / f"{name}.log",
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        return proc_kib(self.pid, "VmRSS")

    def count(self, text: str) -> int:
        """How many lines of this process's output contain ``text``."""
        return sum(text in line for line in self.output().splitlines())


def proc_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS: resident now; VmHWM: resident peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


async def metrics_of(client: httpx.AsyncClient, base: str) -> dict[Any, float]:
    response = await client.get(f"{base}/metrics")
    assert response.status_code == 200, response.text
    return metric_samples(response.text)


async def ratelimit_of(client: httpx.AsyncClient, base: str, key: str) -> dict[str, Any]:
    """``GET /v1/ratelimit`` as ``{"requests": {...}, "tokens": {...}, "concurrency": {...}}``
    (the first entry of each name)."""
    response = await client.get(f"{base}/v1/ratelimit", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    out: dict[str, Any] = {"client": response.json()["client"]}
    for entry in response.json()["limits"]:
        out.setdefault(entry["name"], entry)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Sent:
    started: float  # time.monotonic() when sent
    seconds: float  # until the whole response was read
    status: int  # 0: no answer (connection error or client timeout)
    body: bytes = b""


@dataclass
class LoadResult:
    sent: list[Sent] = field(default_factory=list)

    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.sent)

    def latencies(self, since: float = -math.inf, until: float = math.inf) -> list[float]:
        return [s.seconds for s in self.sent if since <= s.started < until and s.status]


async def run_load(
    client: httpx.AsyncClient,
    requests: Callable[[int], httpx.Request],
    *,
    workers: int,
    max_requests: int,
    max_seconds: float,
    stop: asyncio.Event | None = None,
    keep_body: Callable[[int], bool] = lambda status: status >= 400,
    result: LoadResult | None = None,
) -> LoadResult:
    """Closed-loop load: ``workers`` tasks send ``requests(i)`` one after another until
    ``max_requests`` were sent, ``max_seconds`` passed, or ``stop`` is set. Every request is
    timed; one that gets no answer (error, or 10 s without one) is recorded with status 0.
    Pass ``result`` to watch the answers arrive while the load runs."""
    result = result if result is not None else LoadResult()
    deadline = time.monotonic() + max_seconds
    counter = iter(range(max_requests))

    async def worker() -> None:
        for i in counter:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return
            started = time.monotonic()
            try:
                response = await client.send(requests(i))
                status, body = response.status_code, response.content
            except httpx.HTTPError as exc:
                status, body = 0, repr(exc).encode()
            result.sent.append(
                Sent(
                    started, time.monotonic() - started, status, body if keep_body(status) else b""
                )
            )

    await asyncio.gather(*(worker() for _ in range(workers)))
    return result


@contextlib.asynccontextmanager
async def http_client(connections: int = 100, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for loopback servers: no proxies from the environment, a 10 s timeout."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(10.0), trust_env=False, **kwargs
    ) as client:
        yield client


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def render(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
) -> bytes:
    """One HTTP/1.1 request as bytes (``Host`` and ``Content-Length`` added)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def read_answers(reader: asyncio.StreamReader, count: int = 1) -> list[RawAnswer]:
    """Read ``count`` HTTP/1.1 responses from a raw connection (h11 parses them)."""
    import h11

    conn = h11.Connection(our_role=h11.CLIENT)
    answers: list[RawAnswer] = []
    while len(answers) < count:
        # h11 parses one request/response cycle at a time: send it a request per answer.
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    raise ConnectionError("the server closed the connection mid-answer")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")
        answers.append(RawAnswer(status, headers, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return answers


async def raw_burst(targets: Sequence[tuple[int, bytes]]) -> tuple[list[RawAnswer | str], float]:
    """One connection per (port, request): all connected first, then every request written in
    the same loop iteration, so the burst reaches the servers together. Returns the answers
    (or the error text of a request that got none) and the seconds from first write to last
    answer."""
    connections = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for port, _ in targets)
    )

    async def one(index: int) -> RawAnswer | str:
        reader, writer = connections[index]
        try:
            async with asyncio.timeout(30):
                return (await read_answers(reader))[0]
        except (OSError, TimeoutError, ConnectionError) as exc:
            return repr(exc)
        finally:
            writer.close()

    started = time.monotonic()
    for (_, request), (_, writer) in zip(targets, connections, strict=True):
        writer.write(request)
    answers = await asyncio.gather(*(one(i) for i in range(len(targets))))
    return list(answers), time.monotonic() - started


class RedisCluster:
    """Three Redis masters with ``cluster-enabled yes`` on loopback, joined by
    ``redis-cli --cluster create`` (no replicas), ready once every node says cluster_state:ok."""

    def __init__(self, masters: int = 3) -> None:
        # A node's cluster bus listens 10,000 ports above it: Redis refuses a port over 55535.
        self.nodes = [RedisServer(ports_below=55536) for _ in range(masters)]
        for node in self.nodes:
            node.extra_args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            )

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(
            [_redis_cli(), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

        def ready() -> bool:
            for node in self.nodes:
                info = self.cli(node.port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                if f"cluster_known_nodes:{len(self.nodes)}" not in info:
                    return False
            return True

        wait_until(ready, 30, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.close()

    def command_calls(self, command: str) -> int:
        """Calls of ``command`` (e.g. ``evalsha``) summed over every node (INFO commandstats)."""
        total = 0
        for node in self.nodes:
            for line in self.cli(node.port, "INFO", "commandstats").splitlines():
                if line.startswith(f"cmdstat_{command}:"):
                    total += int(line.split("calls=", 1)[1].split(",", 1)[0])
        return total

    def error_count(self, prefix: str) -> int:
        """Errors whose code starts with ``prefix`` (e.g. ``CROSSSLOT``) over every node."""
        total = 0
        for node in self.nodes:
            for line in self.cli(node.port, "INFO", "errorstats").splitlines():
                if line.startswith(f"errorstat_{prefix}"):
                    total += int(line.split("count=", 1)[1].split(",", 1)[0])
        return total

    def keys_by_node(self, pattern: str) -> dict[int, list[str]]:
        return {
            node.port: [k for k in self.cli(node.port, "--scan", "--pattern", pattern).split() if k]
            for node in self.nodes
        }

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not on PATH (apt-get install -y redis-server)")
    return binary


@contextlib.contextmanager
def gateways(*instances: Gateway) -> Iterator[tuple[Gateway, ...]]:
    """Start every gateway; stop each by its process id at the end, whatever happened."""
    started: list[Gateway] = []
    try:
        for instance in instances:
            instance.start()
            started.append(instance)
        yield instances
    finally:
        for instance in started:
            instance.stop()


async def warm(*instances: Gateway) -> None:
    """Every instance answers /health (its storage is connected) before a burst."""
    async with http_client() as client:
        for instance in instances:
            assert (await client.get(f"{instance.url}/health")).status_code == 200


async def completion_burst(
    instances: Sequence[Gateway], key: str, bodies: Sequence[dict[str, Any]]
) -> tuple[list[RawAnswer | str], float]:
    """Every body to ``/v1/completions`` on its own connection, round-robin over the
    instances, all written at once."""
    return await raw_burst(
        [
            (
                instances[i % len(instances)].port,
                render(
                    "POST",
                    "/v1/completions",
                    headers={"X-API-Key": key, "Content-Type": "application/json"},
                    body=json.dumps(body).encode(),
                ),
            )
            for i, body in enumerate(bodies)
        ]
    )


def check_request_burst(answers: Sequence[RawAnswer | str], span: float, per_minute: int) -> int:
    """A burst against an ``N/minute`` tier: every request answered, 200 or the seed's 429, and
    exactly N admitted (GCRA admits one more per 60/N s, so the bound widens only for a burst
    slower than that). Returns how many were admitted."""
    lost = [a for a in answers if not isinstance(a, RawAnswer)]
    assert not lost, f"{len(lost)} requests got no answer: {lost[:3]}"
    statuses = [a.status for a in answers if isinstance(a, RawAnswer)]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    admitted = statuses.count(200)
    refill = int(span // (60 / per_minute))
    assert per_minute <= admitted <= per_minute + refill, (admitted, span)
    for answer in answers:
        if isinstance(answer, RawAnswer) and answer.status == 429:
            body = answer.json()
            assert error_code(body) == "rate_limit_exceeded"
            assert error_of(body)["limit"] == "requests"
            assert int(answer.headers["retry-after"]) >= 1
    return admitted

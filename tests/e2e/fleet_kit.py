"""The pieces of the fleet end-to-end tests (``test_fleet.py``): mock model servers as replicas,
``quotagate serve`` in front of them, its config, requests through it, and a wiretap that shows
what the gateway really sent a replica.

Every server is a real process on a free loopback port, stopped by its process id
(``quotagate.testing.ServerProcess``); every wait is a condition polled with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from helpers import metric_samples, sample
from quotagate.testing import QuotagateProcess, async_wait_until, http_status

__all__ = [
    "COUNTED_KEY",
    "KEY",
    "MOCK_TOKENS",
    "Answer",
    "ClosingServer",
    "FleetGateway",
    "Load",
    "MockReplica",
    "Samples",
    "Wiretap",
    "ask",
    "ask_many",
    "backend",
    "fleet_config",
    "metrics_of",
    "remaining",
    "sample",
    "start_all",
]

KEY = "sk-fleet-load"  # a tier no test comes near the limits of
#: N/week: one request comes back every 10 minutes, one token every 30 s, so what the key was
#: charged over a few seconds shows exactly.
COUNTED_KEY = "sk-fleet-counted"

TIERS = f"""
log_level = "info"

[health]
requests = "100000/minute"

[tiers.load]
requests = "100000/minute"
tokens = "100000000/minute"
priority = 1

[tiers.counted]
requests = "1000/week"
tokens = "20000/week"

[[keys]]
key = "{KEY}"
tier = "load"

[[keys]]
key = "{COUNTED_KEY}"
tier = "counted"
"""

#: The stream of a ``quotagate mock`` answer with nothing capping it: 24 tokens.
MOCK_TOKENS = 24


def _clean_env() -> dict[str, str]:
    """Our environment without QUOTAGATE_* variables: nothing of the caller's shell changes
    the tested config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}


class MockReplica(QuotagateProcess):
    """``quotagate mock`` on a free loopback port: one replica of a fleet.

    ``received(client)`` is what its ``GET /stats`` counts: the completion requests it got.
    """

    def __init__(
        self, *models: str, tokens_per_second: float = 0.0, latency_ms: float = 0.0
    ) -> None:
        args = ["mock", "--port", "{port}", "--tokens-per-second", str(tokens_per_second)]
        args += ["--latency-ms", str(latency_ms)]
        for model in models:
            args += ["--model", model]
        super().__init__(*args, name="mock-replica", env=_clean_env(), port_retries=3)

    @property
    def base(self) -> str:
        """What the gateway's ``urls`` list holds for it."""
        return f"{self.url}/v1"

    @property
    def label(self) -> str:
        """Its ``replica`` label in the gateway's metrics."""
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return http_status(self.port, "/stats") == 200

    async def received(self, client: httpx.AsyncClient) -> int:
        response = await client.get(f"{self.url}/stats")
        assert response.status_code == 200, response.text
        return int(response.json()["completions"])


def start_all(servers: Sequence[QuotagateProcess]) -> None:
    """Start ``servers`` side by side (each waits for its own readiness)."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        for done in [pool.submit(server.start) for server in servers]:
            done.result()


RELOADED = "quotagate: reloaded"


class FleetGateway(QuotagateProcess):
    """``quotagate serve --config FILE`` on a free loopback port, FILE and its log in
    ``directory``; ``reload(text)`` rewrites FILE and sends the process SIGHUP."""

    def __init__(self, config: str, directory: Path) -> None:
        self.path = directory / "gateway.toml"
        self.path.write_text(config, "utf-8")
        super().__init__(
            "serve", "--config", str(self.path), "--port", "{port}",
            name="fleet-gateway", env=_clean_env(), log=directory / "gateway.log", port_retries=3,
        )  # fmt: skip

    def count(self, text: str) -> int:
        """How many lines of its output contain ``text``."""
        return sum(text in line for line in self.output().splitlines())

    async def reload(self, config: str, within: float = 20.0) -> None:
        """Rewrite the config file, ``kill -HUP``, and wait until the reload is logged."""
        assert self.process is not None, "the gateway is not running"
        before = self.count(RELOADED)
        self.path.write_text(config, "utf-8")
        os.kill(self.process.pid, signal.SIGHUP)
        await async_wait_until(lambda: self.count(RELOADED) > before, within, "the reload logged")


def backend(
    name: str,
    replicas: Sequence[MockReplica | str] = (),
    *,
    models: Sequence[str] | None = None,
    aliases: Mapping[str, str] | None = None,
    health_interval_s: float = 0.5,
    kind: str = "openai",
) -> str:
    """One ``[[backends]]`` entry; a replica is a mock process or a URL."""
    urls = [r if isinstance(r, str) else r.base for r in replicas]
    lines = ["[[backends]]", f"name = {json.dumps(name)}", f"kind = {json.dumps(kind)}"]
    if urls:
        lines.append(f"urls = {json.dumps(urls)}")
    if models is not None:
        lines.append(f"models = {json.dumps(list(models))}")
    lines.append(f"health_interval_s = {health_interval_s}")
    lines.append("connect_timeout_s = 5")
    if aliases:
        lines.append("\n[backends.aliases]")
        lines += [f"{json.dumps(alias)} = {json.dumps(to)}" for alias, to in aliases.items()]
    return "\n".join(lines) + "\n"


def fleet_config(*backends: str) -> str:
    """The tiers and keys every test uses, then ``backends``."""
    return TIERS + "\n" + "\n".join(backends)


# --- requests ------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one completion through the gateway came back as. ``events``: a stream's ``data:``
    payloads in order (None when not streamed); ``problem``: a transport error, if one ended it."""

    status: int = 0
    body: Any = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    events: list[str] | None = None
    problem: str | None = None

    @property
    def done(self) -> bool:
        """A stream that ended with ``[DONE]``."""
        return self.events is not None and self.events[-1:] == ["[DONE]"]

    @property
    def ok(self) -> bool:
        if self.problem is not None or self.status != 200:
            return False
        return self.done if self.events is not None else bool(self.body.get("choices"))

    @property
    def stream_error(self) -> Any:
        """The ``error`` of a stream's last event, when it ended with one (else None)."""
        if not self.events or "[DONE]" in self.events:
            return None
        try:
            last = json.loads(self.events[-1])
        except ValueError:
            return None
        return last.get("error") if isinstance(last, dict) else None

    def text(self) -> str:
        """The generated text of a chat stream."""
        assert self.events is not None
        parts = []
        for event in self.events:
            if event == "[DONE]":
                continue
            for choice in json.loads(event).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
        return "".join(parts)

    def describe(self) -> str:
        if self.problem is not None:
            return f"failed: {self.problem}"
        if self.events is not None:
            return f"{self.status} stream ending {self.events[-1:]}"
        return f"{self.status} {json.dumps(self.body)[:200]}"


async def ask(
    client: httpx.AsyncClient,
    gateway: FleetGateway,
    model: str,
    *,
    stream: bool = False,
    max_tokens: int | None = 1,
    key: str = KEY,
    into: Answer | None = None,
) -> Answer:
    """One chat completion through ``gateway``. A stream's events land in ``into.events`` as
    they arrive (so a test can watch a stream in flight)."""
    answer = into if into is not None else Answer()
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{gateway.url}/v1/chat/completions"
    try:
        if not stream:
            response = await client.post(url, json=body, headers=headers)
            answer.status, answer.headers = response.status_code, response.headers
            answer.body = response.json()
            return answer
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
            answer.status, answer.headers = r.status_code, r.headers
            if r.status_code != 200:
                answer.body = json.loads(await r.aread())
                return answer
            answer.events = []
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    answer.events.append(line[len("data:") :].strip())
    except (httpx.HTTPError, ValueError) as exc:
        answer.problem = repr(exc)
    return answer


async def ask_many(
    count: int, concurrency: int, one: Callable[[int], Awaitable[Answer]]
) -> list[Answer]:
    """``one(i)`` for i in range(count), at most ``concurrency`` at a time, in order of i."""
    slots = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> Answer:
        async with slots:
            return await one(i)

    return list(await asyncio.gather(*(bounded(i) for i in range(count))))


class Load:
    """``workers`` tasks sending requests one after another (every other one streamed) until
    ``stop()``, at most ``limit`` in all; every answer kept in ``answers``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        gateway: FleetGateway,
        model: str,
        *,
        workers: int = 3,
        limit: int = 600,
    ) -> None:
        self.client, self.gateway, self.model = client, gateway, model
        self.workers = workers
        self.limit = limit
        self.answers: list[Answer] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._tasks = [asyncio.create_task(self._work(n)) for n in range(self.workers)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _work(self, n: int) -> None:
        sent = 0
        while not self._stopping.is_set() and len(self.answers) < self.limit:
            stream = (sent + n) % 2 == 1
            max_tokens = 2 if stream else 1
            answer = await ask(
                self.client, self.gateway, self.model, stream=stream, max_tokens=max_tokens
            )
            self.answers.append(answer)
            sent += 1

    async def stop(self) -> None:
        """Let every worker finish the request it is in, then stop."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def failed(self) -> list[str]:
        return [answer.describe() for answer in self.answers if not answer.ok]


# --- what the gateway reports --------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def metrics_of(client: httpx.AsyncClient, gateway: FleetGateway) -> Samples:
    response = await client.get(f"{gateway.url}/metrics")
    assert response.status_code == 200, response.text
    return metric_samples(response.text)


async def remaining(client: httpx.AsyncClient, gateway: FleetGateway, key: str) -> dict[str, int]:
    """``{"requests": n, "tokens": m}``: what ``GET /v1/ratelimit`` says the key has left."""
    response = await client.get(
        f"{gateway.url}/v1/ratelimit", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    out: dict[str, int] = {}
    for entry in response.json()["limits"]:
        out.setdefault(entry["name"], entry["remaining"])
    return out


# --- a wiretap between the gateway and a replica --------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One HTTP request as the gateway wrote it."""

    method: str
    path: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Wiretap:
    """A TCP relay on a free loopback port in front of 127.0.0.1:``target``, run on the test's
    event loop: it keeps every byte sent through it towards the target, i.e. what the gateway
    really sent the replica (a mock echoes the ``model`` it got, so its answer alone cannot tell
    whether the gateway rewrote an alias).

    ``async with Wiretap(port) as tap:``; a gateway started while it runs must be started off
    the loop (``asyncio.to_thread``): its start-up probe goes through the relay.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._streams: list[bytearray] = []  # per connection, in the order they came
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Close every connection through it, both ways, at once: to the gateway, its kept-alive
        connection to the replica has just been closed by the other end."""
        for writer in self._writers:
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        sent = bytearray()
        self._streams.append(sent)
        await asyncio.gather(_copy(reader, up_writer, sent), _copy(up_reader, writer, None))

    def requests(self) -> list[Sent]:
        """Every request sent through the relay, parsed (requests of one connection in order)."""
        found = []
        for stream in self._streams:
            rest = bytes(stream)
            while b"\r\n\r\n" in rest:
                head, rest = rest.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                found.append(Sent(method, path, rest[:length]))
                rest = rest[length:]
        return found


async def _copy(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bytearray | None
) -> None:
    try:
        while data := await source.read(65536):
            if keep is not None:
                keep += data
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.close()


class _CloseAtOnce(asyncio.Protocol):
    def __init__(self, server: ClosingServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.accepted += 1
        transport.close()


class ClosingServer:
    """A TCP server on a free loopback port, run on the test's event loop, that closes every
    connection as soon as it has accepted it (what a proxy in front of a dead model server, or
    a server out of connections, does): ``async with ClosingServer() as server: server.base``;
    ``accepted`` counts the connections it took.
    """

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _CloseAtOnce(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

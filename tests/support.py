"""Real servers for tests, built on ``quotagate.testing``: a redis-server and a uvicorn app on
free loopback ports, stopped by their process ids; an httpx client calling an app in process;
the environment for a Python child process; a stopwatch for counts that refill in real time.

``free_port``, ``ServerProcess`` and ``QuotagateProcess`` are re-exported from
``quotagate.testing``, where they live (the shipped tools use them too)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import httpx
import redis.asyncio as aioredis

import quotagate
from quotagate.testing import QuotagateProcess, ServerProcess, free_port

__all__ = [
    "QuotagateProcess",
    "RedisServer",
    "ServerProcess",
    "Stopwatch",
    "UvicornServer",
    "asgi_client",
    "free_port",
    "python_env",
]


class RedisServer(ServerProcess):
    """A throwaway ``redis-server`` bound to 127.0.0.1, ready once it answers PING;
    ``stop``/``start`` keep its port (another one only if that was taken meanwhile)."""

    def __init__(self, *extra_args: str, ports_below: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: the test command installs it "
                "(apt-get install -y redis-server); Redis tests never skip"
            )
        # Made by start() (a server never started leaves nothing), removed by close().
        self.dir = Path(tempfile.gettempdir()) / f"qg-redis-{uuid.uuid4().hex[:12]}"
        self.extra_args = extra_args
        super().__init__(
            [binary],
            name="redis-server",
            startup_timeout=10,
            port_retries=4,
            ports_below=ports_below,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            *self.argv,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.dir)),
            *self.extra_args,
        ]

    def start(self) -> None:
        self.dir.mkdir(exist_ok=True)
        super().start()

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


class UvicornServer(ServerProcess):
    """An ASGI app served by a real uvicorn process on a free loopback port; ``env`` is added
    to this process's environment."""

    def __init__(
        self,
        app: str,
        *,
        app_dir: str = ".",
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = ("--no-proxy-headers",),
    ) -> None:
        # uvicorn itself believes X-Forwarded-For from 127.0.0.1 unless told not to; tests of
        # quotagate's own trusted-proxy rules turn that off.
        argv = [sys.executable, "-m", "uvicorn", app, "--app-dir", app_dir, "--host", "127.0.0.1"]
        argv += ["--port", "{port}", "--log-level", "warning", *extra_args]
        super().__init__(argv, name="uvicorn", env={**os.environ, **(env or {})})


def asgi_client(app: Any, address: str | None = None) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in process, as the peer ``address`` when given."""
    if address is None:
        transport = httpx.ASGITransport(app=app)
    else:
        transport = httpx.ASGITransport(app=app, client=(address, 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def python_env(**extra: str) -> dict[str, str]:
    """This process's environment (plus ``extra``) with the quotagate under test first on
    PYTHONPATH: a Python child (a worker script, ``python -c``) imports the code being tested,
    not whatever else is installed."""
    source = str(Path(quotagate.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


class Stopwatch:
    """Wall-clock seconds around requests that real time refills (a server process, Redis
    ``TIME``): a GCRA limit of capacity C and emission interval T (period / C), hit n times
    within the block from a full bucket, has between C - n and C - n + ``refills(T)`` left.

        with Stopwatch() as watch:
            responses = [client.get("/health") for _ in range(30)]  # 600/minute: T = 0.1 s
        assert 570 <= remaining(responses[-1]) <= 570 + watch.refills(0.1)
    """

    def __init__(self) -> None:
        self.started = self.stopped = 0.0

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped = time.monotonic()

    @property
    def seconds(self) -> float:
        """The block's length (so far, inside it)."""
        return (self.stopped or time.monotonic()) - self.started

    def refills(self, interval: float) -> int:
        """Whole emission intervals of ``interval`` seconds in the block: how many units a
        limit can have regained while it ran."""
        return int(self.seconds // interval)


#: Sent once per new connection, not per decision.
_HANDSHAKE = {"HELLO", "CLIENT", "SELECT", "AUTH"}


async def top_level_commands(url: str, work: Callable[[], Awaitable[None]]) -> list[str]:
    """The commands clients sent to the Redis at ``url`` while ``work`` ran (MONITOR; what
    scripts call inside, and connection handshakes, left out). Markers sent before and after
    bound the window: no sleeping for MONITOR to start."""
    client = aioredis.Redis.from_url(url)
    seen: list[str] = []
    marker = asyncio.Event()
    try:
        async with client.monitor() as monitor:

            async def collect() -> None:
                while True:
                    entry = await monitor.next_command()
                    name = entry["command"].split()[0].upper()
                    if entry.get("client_type") != "lua" and name not in _HANDSHAKE:
                        seen.append(name)
                    if name == "ECHO":
                        marker.set()

            collector = asyncio.create_task(collect())
            await client.execute_command("ECHO", "start")
            await asyncio.wait_for(marker.wait(), 10)
            marker.clear()
            await work()
            await client.execute_command("ECHO", "done")
            await asyncio.wait_for(marker.wait(), 10)
            collector.cancel()
    finally:
        await client.aclose()
    start = seen.index("ECHO")
    return seen[start + 1 : seen.index("ECHO", start + 1)]

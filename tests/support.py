"""Real servers for tests: a redis-server on a free loopback port, stopped by its process id."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throwaway ``redis-server`` bound to 127.0.0.1; ``stop``/``start`` keep its port."""

    def __init__(self, *extra_args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: the test command installs it "
                "(apt-get install -y redis-server); Redis tests never skip"
            )
        self.binary = binary
        self.extra_args = extra_args
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="qg-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for _ in range(5):
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    *self.extra_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # port taken meanwhile: pick another
                if _ping(self.port):
                    return
                time.sleep(0.02)
            self.stop()
            self.port = free_port()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerProcess:
    """A server run as ``argv`` (output to a log file), ready once 127.0.0.1:``port`` accepts
    a connection; stopped by its process id."""

    def __init__(
        self, argv: list[str], *, port: int, name: str, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.port = port
        self.name = name
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        fd, path = tempfile.mkstemp(prefix=f"qg-{name}-", suffix=".log")
        os.close(fd)
        self.log = Path(path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_port: int | None = None) -> None:
        """Start, and wait until ``wait_port`` (default: ``port``) accepts a connection."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        port = self.port if wait_port is None else wait_port
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"{self.name} exited: {output}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on port {port}")

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)


class UvicornServer(ServerProcess):
    """An ASGI app served by a real uvicorn process on a free loopback port."""

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
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", app, "--app-dir", app_dir, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--log-level", "warning", *extra_args]
        super().__init__(argv, port=port, name="uvicorn", env=env)


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def asgi_client(app: Any, address: str | None = None) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in process, as the peer ``address`` when given."""
    if address is None:
        transport = httpx.ASGITransport(app=app)
    else:
        transport = httpx.ASGITransport(app=app, client=(address, 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")

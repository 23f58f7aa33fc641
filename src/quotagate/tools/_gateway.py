"""A ``quotagate serve`` child process on a free loopback port, started, restarted and stopped by
its process id (never by name: other gateways on the machine are none of our business)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ._common import ToolError

__all__ = ["GatewayProcess", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """``python -m quotagate serve --config FILE`` on 127.0.0.1, ready once ``/health`` answers.

    Args:
        config_path: the TOML file to serve; None for the embedded default.
        startup_timeout: seconds to wait for ``/health`` before giving up.
    """

    def __init__(self, config_path: str | None, *, startup_timeout: float = 30.0) -> None:
        self.config_path = config_path
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        fd, log = tempfile.mkstemp(prefix="quotagate-verify-", suffix=".log")
        os.close(fd)
        self.log = Path(log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start and wait until it answers; a taken port is retried on another one.

        Raises:
            ToolError: it exited or did not answer in time (with its last log line).
        """
        for _ in range(3):
            self._spawn()
            if self._wait_ready():
                return
            tail = self._log_tail()
            self.stop()
            if "address already in use" not in tail.lower():
                raise ToolError(f"the gateway did not start: {tail or 'no output'}")
            self.port = free_port()
        raise ToolError(f"the gateway did not start: {self._log_tail()}")

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "quotagate", "serve"]
        if self.config_path is not None:
            command += ["--config", self.config_path]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.TransportError):
                    client.get(self.url + "/health")
                    return True  # any HTTP answer: the server is up
                time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line]
        return lines[-1].strip() if lines else ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL after 10 s (uvicorn drains connections first)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port (another one if it was taken meanwhile)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

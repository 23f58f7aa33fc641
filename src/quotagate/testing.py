"""Helpers for testing code that uses quotagate, and the one support layer of quotagate's own
tests, benchmarks and tools (``verify``): a clock you move by hand, a free loopback port,
servers run as child processes, and polling until a condition holds.

- ``FakeClock``: pass it as ``MemoryStorage(clock=...)`` and move time with ``advance()``.
- ``free_port()``, ``port_open(port)``, ``http_status(port, path)``: a loopback port to listen
  on; whether one accepts a connection; what it answers to a GET.
- ``ServerProcess``: a server started as a child process on a loopback port, ready once it
  accepts a connection (or whatever its ``ready()`` says), stopped by its process id (never by
  name: other servers on the machine are none of ours), its output kept in a log file.
  ``QuotagateProcess`` runs ``python -m quotagate ARGS`` (``serve``, ``mock``) that way.
- ``wait_until(condition, within)`` and ``async_wait_until``: poll until ``condition()``
  holds; raise ``TimeoutError`` naming what did not happen.

Standard library only: ``import quotagate`` imports this module (for ``FakeClock``), and
``benchmarks/http.py`` imports it with its own directory first on ``sys.path``, where ``http``
is that script and not the standard library's package.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

__all__ = [
    "FakeClock",
    "QuotagateProcess",
    "ServerProcess",
    "ServerStartError",
    "async_wait_until",
    "core_busy",
    "free_port",
    "http_status",
    "port_open",
    "process_cpu",
    "wait_until",
]

LOOPBACK = "127.0.0.1"


class FakeClock:
    """A clock that only moves when told to; pass it as ``MemoryStorage(clock=...)``.

    Starts at a realistic epoch time so that calendar-aligned windows behave as in production.
    """

    __slots__ = ("now",)

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (may be fractional)."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self.now += seconds


# --- ports ----------------------------------------------------------------------------------


def free_port(below: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; another process may take it
    before it is used, which ``ServerProcess(port_retries=...)`` survives).

    ``below``: a port under this number (a Redis Cluster node's port must leave room for its
    bus port, 10,000 higher: at most 55535).
    """
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if below is None or port < below:
            return port
    raise RuntimeError(f"no free loopback port below {below}")


def port_open(port: int, timeout: float = 0.2) -> bool:
    """Whether 127.0.0.1:``port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(port: int, path: str = "/", timeout: float = 1.0) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:``port``, or None when nothing answers HTTP."""
    request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(request.encode("latin-1"))
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


# --- polling --------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], object],
    within: float,
    what: str = "the condition",
    *,
    interval: float = 0.02,
) -> float:
    """Call ``condition`` every ``interval`` seconds until it returns something true.

    Returns:
        The seconds it took (0.0 when it held at once).

    Raises:
        TimeoutError: it did not hold within ``within`` seconds (the message names ``what``).
    """
    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        if waited > within:
            raise TimeoutError(f"{what}: not within {within:g} s")
        time.sleep(interval)
    return time.monotonic() - started


async def async_wait_until(
    condition: Callable[[], object] | Callable[[], Awaitable[object]],
    within: float,
    what: str = "the condition",
    *,
    interval: float = 0.02,
) -> float:
    """``wait_until`` in an event loop: ``condition`` may be a plain or an async function, and
    the loop runs other tasks between two calls.

    Returns:
        The seconds it took (0.0 when it held at once).

    Raises:
        TimeoutError: it did not hold within ``within`` seconds (the message names ``what``).
    """
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within:g} s")
        await asyncio.sleep(interval)


# --- processes ------------------------------------------------------------------------------


def process_cpu(pid: int | None) -> float:
    """utime + stime of a process in seconds (0 once it is gone): a benchmark's CPU per
    request of the process under test."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy(cores: Sequence[int] | None = None) -> dict[int, float]:
    """Busy CPU seconds so far per core (of ``cores``, or all): every state of /proc/stat but
    idle and iowait."""
    tick = os.sysconf("SC_CLK_TCK")
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            core = int(name[3:])
            if cores is None or core in cores:
                values = [int(x) for x in fields[:8]]
                busy[core] = (sum(values) - values[3] - values[4]) / tick
    return busy


class ServerStartError(RuntimeError):
    """A ``ServerProcess`` exited, or was not ready in time, during ``start()``.

    Attributes:
        output: everything the process wrote (its log).
    """

    def __init__(self, message: str, output: str) -> None:
        self.output = output
        lines = [line for line in output.splitlines() if line.strip()]
        super().__init__(message + (":\n" + "\n".join(lines[-20:]) if lines else " (no output)"))

    @property
    def last_line(self) -> str:
        """The last line it wrote ('' when none): usually the reason."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class ServerProcess:
    """A server run as a child process on a loopback port.

    ``start()`` spawns it (stdout and stderr appended to ``log``, stdin empty) and waits until
    ``ready()`` (by default: the port accepts a connection); ``stop()`` sends SIGTERM to its
    process id, then SIGKILL if it has not exited; ``close()`` (and leaving a ``with`` block)
    also removes a log file made here.

    Args:
        argv: the command; ``{port}`` in an argument becomes the port.
        name: what it is called in errors and in the log file's name.
        port: the port it listens on; None picks a free one.
        ports_below: free ports are picked under this number (see ``free_port``).
        env: the child's whole environment (as for ``subprocess.Popen``); None: ours.
        cwd: its working directory; None: ours.
        log: the file its output is appended to; None: a temporary file, removed by close().
        startup_timeout: seconds ``start()`` waits for it to be ready.
        port_retries: how many times ``start()`` moves to another free port when the one
            picked here was taken meanwhile (the output says "address already in use").
        new_session: start it in a session of its own and signal the whole process group
            (a server that spawns worker processes).
        stop_signal: what ``stop()`` sends first (SIGINT for a server that shuts down cleanly
            only on that).
        stop_timeout: seconds between ``stop_signal`` and SIGKILL.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "server",
        port: int | None = None,
        ports_below: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        startup_timeout: float = 20.0,
        port_retries: int = 0,
        new_session: bool = False,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.ports_below = ports_below
        self.port = free_port(ports_below) if port is None else port
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.port_retries = port_retries if port is None else 0  # a given port is kept
        self.new_session = new_session
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._own_log = log is None
        if log is None:  # created by the first start(): a server never started leaves nothing
            log = Path(tempfile.gettempdir()) / f"qg-{name}-{uuid.uuid4().hex[:12]}.log"
        self.log = log

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while it runs (None before start and after stop)."""
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        """The argv to spawn, for the current port."""
        return [arg.replace("{port}", str(self.port)) for arg in self.argv]

    def ready(self) -> bool:
        """Whether it serves yet; override for a surer sign than an accepted connection.

        An override may raise ``ServerStartError`` to give up at once (it answered, wrongly).
        """
        return port_open(self.port)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Spawn it and wait until it is ready.

        Raises:
            ServerStartError: it exited or was not ready in time (it is stopped first).
        """
        for attempt in range(self.port_retries + 1):
            self._spawn()
            try:
                self._wait_ready()
                return
            except ServerStartError as exc:
                self.stop()
                taken = "address already in use" in exc.output.lower()
                if not taken or attempt == self.port_retries:
                    raise
                self.port = free_port(self.ports_below)

    def _spawn(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None
        try:
            wait_until(
                lambda: process.poll() is not None or self.ready(),
                self.startup_timeout,
                interval=0.05,
            )
        except TimeoutError:
            raise ServerStartError(
                f"{self.name} was not ready within {self.startup_timeout:g} s", self.output()
            ) from None
        if process.poll() is not None:
            raise ServerStartError(
                f"{self.name} exited with code {process.returncode}", self.output()
            )

    def stop(self) -> None:
        """``stop_signal`` (SIGTERM) by process id (to its group with ``new_session``), SIGKILL
        after ``stop_timeout`` seconds; nothing when it is not running."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self._signal(process, self.stop_signal)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._signal(process, signal.SIGKILL)
            process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL now: no shutdown, nothing it holds released."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self._signal(process, signal.SIGKILL)
        process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections but answers nothing until ``resume()``."""
        assert self.process is not None, f"{self.name} is not running"
        self._signal(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None, f"{self.name} is not running"
        self._signal(self.process, signal.SIGCONT)

    def _signal(self, process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            if self.new_session:
                os.killpg(process.pid, signum)  # its own session: process group id == pid
            else:
                os.kill(process.pid, signum)

    def restart(self) -> None:
        """Stop, then start again on the same port (another one if it was taken meanwhile and
        ``port_retries`` allows)."""
        self.stop()
        self.start()

    def output(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop it, and remove its log file if that was made here."""
        self.stop()
        if self._own_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # its log too: nothing is left of a server that never served
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class QuotagateProcess(ServerProcess):
    """``python -m quotagate ARGS`` (``serve``, ``mock``) as a ``ServerProcess``, run by this
    interpreter; ``{port}`` in ARGS becomes its port. The options are ``ServerProcess``'s."""

    def __init__(
        self,
        *args: str,
        name: str = "quotagate",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        startup_timeout: float = 20.0,
        port_retries: int = 0,
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "quotagate", *args],
            name=name,
            port=port,
            env=env,
            log=log,
            startup_timeout=startup_timeout,
            port_retries=port_retries,
        )

"""``quotagate.testing``: the support layer of the tests, the benchmarks and ``verify``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from quotagate.testing import (
    ServerProcess,
    ServerStartError,
    async_wait_until,
    free_port,
    http_status,
    port_open,
    wait_until,
)

#: A one-file HTTP server: ``python -m http.server`` answers GET / with a directory listing.
HTTP_SERVER = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]


def test_wait_until_returns_the_seconds_it_took_and_names_what_did_not_happen() -> None:
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), 5, interval=0.001) >= 0
    with pytest.raises(TimeoutError, match=r"the moon: not within 0\.05 s"):
        wait_until(lambda: False, 0.05, "the moon", interval=0.01)


async def test_async_wait_until_takes_plain_and_async_conditions() -> None:
    plain = iter([0, 1])
    assert await async_wait_until(lambda: next(plain), 5, interval=0.001) >= 0

    async def ready() -> bool:
        return True

    assert await async_wait_until(ready, 5) < 5
    with pytest.raises(TimeoutError, match="never"):
        await async_wait_until(lambda: None, 0.05, "never", interval=0.01)


def test_a_server_is_ready_serves_and_is_stopped_by_its_pid(tmp_path: Path) -> None:
    server = ServerProcess(HTTP_SERVER, name="http", cwd=tmp_path)
    assert not server.log.exists()  # made by start(), not before
    with server:
        assert server.alive()
        assert server.pid is not None
        assert http_status(server.port, "/") == 200
        process = server.process
    assert process is not None
    assert process.poll() is not None  # stopped
    assert server.pid is None
    assert not port_open(server.port)
    assert not server.log.exists()  # a log made here goes with it


def test_a_server_that_exits_says_so_with_its_last_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('first'); sys.exit('bad config: x')"]
    server = ServerProcess(argv, name="broken", log=tmp_path / "broken.log")
    with pytest.raises(ServerStartError, match="broken exited with code 1") as raised:
        server.start()
    assert raised.value.last_line == "bad config: x"
    assert "first" in raised.value.output
    assert (tmp_path / "broken.log").exists()  # a log given by the caller is the caller's


def test_a_server_not_ready_in_time_is_stopped() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ServerProcess(argv, name="sleeper", startup_timeout=0.3)
    with pytest.raises(ServerStartError, match=r"sleeper was not ready within 0\.3 s"):
        server.start()
    assert server.process is None
    server.close()


def test_a_port_taken_meanwhile_is_retried_on_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = taken.getsockname()[1]
        server = ServerProcess(HTTP_SERVER, name="http", port_retries=1)
        server.port = port  # as if another process took the free port picked here
        with server:
            assert server.port != port
            assert http_status(server.port, "/") == 200


def test_a_port_given_by_the_caller_is_kept() -> None:
    port = free_port()
    server = ServerProcess(HTTP_SERVER, name="http", port=port, port_retries=3)
    assert server.port_retries == 0
    with server:
        assert server.url == f"http://127.0.0.1:{port}"
        server.restart()
        assert server.port == port
        assert http_status(port, "/") == 200


def test_a_free_port_below_a_bound() -> None:
    # A Redis Cluster node needs one at most 55535 (its bus port is 10,000 higher).
    assert all(free_port(below=55536) < 55536 for _ in range(50))

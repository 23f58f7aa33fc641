from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import quotagate as qg
from support import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole run; tests isolate themselves by key prefix."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> qg.FakeClock:
    return qg.FakeClock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def storage(
    request: pytest.FixtureRequest, clock: qg.FakeClock, key_prefix: str
) -> AsyncIterator[qg.Storage]:
    """Every storage backend, each driven by the same fake clock."""
    if request.param == "memory":
        yield qg.MemoryStorage(clock=clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_storage = qg.RedisStorage(server.url, prefix=key_prefix, clock=clock, timeout=2.0)
    await redis_storage.start()
    try:
        yield redis_storage
    finally:
        await redis_storage.aclose()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is not a passing one: fail the run if anything was skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

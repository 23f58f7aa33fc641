"""Same answers everywhere: random sequences of hits and adjusts on memory and on real Redis
give identical results, value for value (the Lua script and the Python algorithms are twins)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quotagate as qg
from quotagate.storage import FIXED_WINDOW, GCRA
from quotagate.storage.redis import RedisStorage
from support import RedisServer

pytestmark = pytest.mark.redis

START = 1_800_000_000_000_000
RATES = [
    qg.Rate(3, 1.0),
    qg.Rate(10, 60.0),
    qg.Rate(7, 60.0),
    qg.Rate(1000, 86400.0),
    qg.Rate(5, 10.0),
]
KEYS = ["{a}:req", "{a}:tok", "{b}:req"]

limit_spec = st.tuples(
    st.sampled_from(KEYS), st.sampled_from(RATES), st.sampled_from([GCRA, FIXED_WINDOW])
)
step = st.one_of(
    st.tuples(
        st.just("decide"),
        st.lists(st.tuples(limit_spec, st.integers(0, 12)), min_size=1, max_size=3),
        st.integers(0, 20_000_000),
    ),
    st.tuples(
        st.just("adjust"),
        st.lists(st.tuples(limit_spec, st.integers(-15, 15)), min_size=1, max_size=2),
        st.integers(0, 20_000_000),
    ),
)


def _program(
    limits: list[tuple[tuple[str, qg.Rate, int], int]],
) -> tuple[list[str], list[int | str]]:
    keys: list[str] = []
    args: list[int | str] = [len(limits)]
    for (key, rate, algorithm), amount in limits:
        interval = rate.interval_us if algorithm == GCRA else rate.period_us
        keys.append(f"{key}:{algorithm}:{rate.key_suffix}")
        args += (algorithm, rate.amount, interval, amount)
    return keys, args


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_memory_and_redis_agree(
    redis_server: RedisServer, loop: asyncio.AbstractEventLoop, steps: list[tuple[str, list, int]]
) -> None:
    async def run() -> None:
        memory = qg.MemoryStorage()
        redis_storage = RedisStorage(
            redis_server.url, prefix=f"p{uuid.uuid4().hex[:10]}", timeout=2.0
        )
        await redis_storage.start()
        try:
            now = START
            for kind, limits, advance in steps:
                now += advance
                keys, args = _program(limits)
                if kind == "decide":
                    expected = await memory.decide(keys, args, now_us=now)
                    got = await redis_storage.decide(keys, args, now_us=now)
                else:
                    expected = await memory.adjust(keys, args, now_us=now)
                    got = await redis_storage.adjust(keys, args, now_us=now)
                assert got == expected, (kind, limits, now - START)
        finally:
            await redis_storage.aclose()

    loop.run_until_complete(run())

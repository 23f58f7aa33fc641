"""Engine behaviour that does not depend on the backend: memory with a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quotagate as qg
from quotagate._types import Algorithm


@pytest.fixture
def storage(clock: qg.FakeClock) -> qg.MemoryStorage:
    return qg.MemoryStorage(clock=clock)


class CountingStorage(qg.MemoryStorage):
    """Memory storage that counts the calls it answers."""

    calls = 0

    async def decide(self, keys, args, now_us=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().decide(keys, args, now_us)


async def test_hit_many_is_one_storage_call(clock: qg.FakeClock) -> None:
    storage = CountingStorage(clock=clock)
    limiter = qg.RateLimiter(storage)
    await limiter.hit_many(
        [
            qg.Hit("{c}:req", "60/minute; 1000/day"),
            qg.Hit("{c}:tok", "40000/minute", cost=350),
            qg.Hit("{c}:day", "5000/day", algorithm="fixed_window"),
        ],
        acquire=qg.Acquire("{c}:conc", 4),
    )
    assert storage.calls == 1


async def test_overlimit_cache_answers_repeats_without_the_storage(clock: qg.FakeClock) -> None:
    storage = CountingStorage(clock=clock)
    limiter = qg.RateLimiter(storage, overlimit_cache=True)
    for _ in range(2):
        await limiter.hit("k", "2/minute")
    first = await limiter.hit("k", "2/minute")
    assert not first.allowed
    calls = storage.calls
    clock.advance(10)
    again = await limiter.hit("k", "2/minute")
    assert storage.calls == calls  # answered in process
    assert not again.allowed
    assert again.retry_after == pytest.approx(first.retry_after - 10)
    # A smaller cost is a different question: it goes to the storage.
    await limiter.hit("k", "2/minute", cost=0)
    assert storage.calls == calls + 1
    clock.advance(20)  # past retry_after: the storage decides again, and admits
    assert (await limiter.hit("k", "2/minute")).allowed


async def test_overlimit_cache_forgets_after_a_refund(clock: qg.FakeClock) -> None:
    limiter = qg.RateLimiter(qg.MemoryStorage(clock=clock), overlimit_cache=True)
    await limiter.hit("k", "10/minute", cost=10)
    assert not (await limiter.hit("k", "10/minute")).allowed
    await limiter.adjust("k", "10/minute", delta=-5)
    assert (await limiter.hit("k", "10/minute")).allowed


def test_overlimit_cache_defaults_on_for_shared_storages_only() -> None:
    assert qg.RateLimiter("memory://")._cache is None
    assert qg.RateLimiter("redis://127.0.0.1:1/0")._cache is not None


async def test_overlimit_cache_can_be_turned_off(clock: qg.FakeClock) -> None:
    storage = CountingStorage(clock=clock)
    limiter = qg.RateLimiter(storage, overlimit_cache=False)
    for _ in range(5):
        await limiter.hit("k", "1/minute")
    assert storage.calls == 5


async def test_memory_drops_state_whose_bucket_is_full_again(
    storage: qg.MemoryStorage, clock: qg.FakeClock
) -> None:
    limiter = qg.RateLimiter(storage)
    for i in range(100):
        await limiter.hit(f"client-{i}", "10/minute")
    assert len(storage) == 100
    clock.advance(6)  # every bucket is full again
    for i in range(5):
        await limiter.hit(f"new-{i}", "10/minute", cost=0)  # reads store nothing
    assert len(storage) == 100
    assert storage.sweep() == 100
    assert len(storage) == 0


async def test_memory_reclaims_quiet_clients_as_new_ones_arrive(
    storage: qg.MemoryStorage, clock: qg.FakeClock
) -> None:
    limiter = qg.RateLimiter(storage)
    peak = 0
    for i in range(20_000):
        await limiter.hit(f"ip:10.{i // 65536}.{i // 256 % 256}.{i % 256}", "1/second")
        clock.advance(0.001)  # 1,000 new clients a second, each quiet after its request
        peak = max(peak, len(storage))
    # At most ~1,000 clients are limited at any moment; the table never holds more than
    # about twice that (it is swept whenever it doubles).
    assert peak <= 2 * 1024 + 1


async def test_memory_caps_its_keys_and_evicts_least_recently_used(clock: qg.FakeClock) -> None:
    storage = qg.MemoryStorage(clock=clock, max_keys=3)
    limiter = qg.RateLimiter(storage, overlimit_cache=False)
    for key in ("a", "b", "c"):
        await limiter.hit(key, "1/minute")
    await limiter.hit("a", "5/hour")  # state for a new (key, period): evicts the LRU one
    assert len(storage) == 3
    assert (await limiter.hit("a", "1/minute")).allowed is True  # "a" was the LRU: evicted
    assert not (await limiter.hit("c", "1/minute")).allowed  # "c" kept its state


async def test_memory_flood_of_keys_stays_bounded(clock: qg.FakeClock) -> None:
    storage = qg.MemoryStorage(clock=clock, max_keys=1000)
    limiter = qg.RateLimiter(storage)
    for i in range(5000):
        decision = await limiter.hit(f"ip:10.0.{i // 256}.{i % 256}", "60/minute")
        assert decision.allowed  # never refused because of the cap
        assert len(storage) <= 1000
    # Evicted a batch (1% of the cap) at a time, least recently used first.
    assert len(storage) >= 990
    assert not (await limiter.hit("ip:10.0.19.135", "60/minute", cost=60)).allowed  # kept
    assert (await limiter.hit("ip:10.0.0.0", "60/minute", cost=60)).allowed  # evicted


async def test_decision_values() -> None:
    limiter = qg.RateLimiter("memory://")
    decision = await limiter.hit("k", "10/minute")
    assert decision.allowed
    assert decision.reason == "allowed"
    assert decision.retry_after == 0.0
    assert (decision.limit, decision.remaining) == (10, 9)
    with pytest.raises(AttributeError):
        decision.allowed = False  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(min_value=0, max_value=5),  # cost; 5 is over the fixed window's 4
            st.floats(min_value=0, max_value=20),  # seconds since the previous step
        ),
        max_size=40,
    ),
    rates=st.sampled_from(["3/minute", "4/10 seconds"]),
    algorithm=st.sampled_from(["gcra", "fixed_window"]),
)
async def test_one_limit_in_memory_decides_as_the_general_program(
    steps: list[tuple[str, int, float]], rates: str, algorithm: Algorithm
) -> None:
    """``hit`` answers a single in-memory limit on a short path; ``hit_many`` runs the general
    storage program. Same clock, same requests: the same decisions, value for value."""
    clock = qg.FakeClock()
    short, general = (
        qg.RateLimiter(qg.MemoryStorage(clock)),
        qg.RateLimiter(qg.MemoryStorage(clock)),
    )
    for client, cost, seconds in steps:
        clock.advance(seconds)
        one = await short.hit(client, rates, cost, algorithm)
        assert one == await general.hit_many([qg.Hit(client, rates, cost, algorithm)])
    assert short.hit_now("a", "1/minute; 9/hour") is None  # two limits: the general program


@pytest.mark.parametrize("cost", [-1, 1.5, True])
async def test_bad_cost_is_a_config_error(cost: object) -> None:
    limiter = qg.RateLimiter()
    with pytest.raises(qg.ConfigError, match="cost"):
        await limiter.hit("k", "10/minute", cost=cost)  # type: ignore[arg-type]


async def test_bad_algorithm_is_a_config_error() -> None:
    with pytest.raises(qg.ConfigError, match="algorithm"):
        await qg.RateLimiter().hit("k", "10/minute", algorithm="leaky")  # type: ignore[arg-type]


def test_storage_from_url() -> None:
    assert isinstance(qg.storage_from_url("memory://"), qg.MemoryStorage)
    assert qg.storage_from_url("memory://?max_keys=10").max_keys == 10  # type: ignore[attr-defined]
    fallback = qg.storage_from_url("redis://127.0.0.1:1/0")
    assert isinstance(fallback, qg.FallbackStorage)
    assert fallback.policy == "memory"
    plain = qg.storage_from_url("redis://127.0.0.1:1/0?fallback=none&timeout_ms=50&prefix=x")
    assert isinstance(plain, qg.RedisStorage)
    assert plain.timeout == 0.05
    assert plain.url == "redis://127.0.0.1:1/0"
    deny = qg.storage_from_url("redis://127.0.0.1:1/0", fallback="deny")
    assert isinstance(deny, qg.FallbackStorage)
    assert deny.policy == "deny"
    assert isinstance(qg.storage_from_url("redis+cluster://127.0.0.1:7000"), qg.FallbackStorage)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mongodb://x", "unsupported storage URL"),
        ("redis://h/0?fallback=maybe", "fallback must be"),
        ("redis://h/0?timeout_ms=soon", "bad storage URL parameter"),
        ("memory://?max_keys=lots", "max_keys"),
    ],
)
def test_storage_from_url_errors(url: str, match: str) -> None:
    with pytest.raises(qg.ConfigError, match=match):
        qg.storage_from_url(url)


def test_mask_url_hides_the_password() -> None:
    from quotagate.storage import mask_url

    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_two_rates_of_one_period_keep_states_of_their_own(clock: qg.FakeClock) -> None:
    limiter = qg.RateLimiter(qg.MemoryStorage(clock=clock), overlimit_cache=False)
    decisions = [await limiter.hit("k", "2/minute; 3/minute") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]  # the smaller one counts
    assert [s.key for s in decisions[0].states] == ["{k}:60s", "{k}:60s#2"]

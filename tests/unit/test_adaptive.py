"""The adaptive concurrency controller: slow start, additive increase while the limit is in use,
cut on the server's own load (metrics, a 429/503, latency against its baseline), held at a full
KV cache, never below min or above max, no second cut while the first drains; the metrics of
vLLM and llama.cpp read."""

from __future__ import annotations

import pytest

from quotagate.gateway.adaptive import Controller, Load
from quotagate.gateway.fleet import metrics_url

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
"""


class InFlight:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


def controller(min_c: int = 2, max_c: int = 64, **kw: float) -> tuple[Controller, InFlight]:
    carried = InFlight()
    return Controller(
        min_concurrency=min_c,
        max_concurrency=max_c,
        in_flight=carried,
        **kw,  # type: ignore[arg-type]
    ), carried


def busy(c: Controller, carried: InFlight) -> None:
    """An interval in which the limit was all used."""
    carried.count = c.limit
    c.started()


def test_reads_vllm_and_llama_cpp_metrics() -> None:
    assert Load.parse(VLLM) == Load(7.0, 3.0, 0.5)
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\nvllm:num_requests_waiting 0\n'
    assert Load.parse(old) == Load(None, 0.0, 0.25)
    llama = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 5\n"
    assert Load.parse(llama) == Load(2.0, 5.0, None)
    two_models = (
        'vllm:num_requests_waiting{model_name="a"} 1\nvllm:num_requests_waiting{model_name="b"} 2\n'
    )
    assert Load.parse(two_models) == Load(None, 3.0, None)
    assert Load.parse("# nothing here\nprocess_cpu_seconds_total 3\n") is None


def test_metrics_url_auto_path_url_and_none() -> None:
    assert metrics_url("auto", "http://10.0.0.5:8000/v1") == "http://10.0.0.5:8000/metrics"
    assert metrics_url("auto", "http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url("/stats/prom", "https://h/v1") == "https://h/stats/prom"
    assert metrics_url("http://m:9/metrics", "http://h/v1") == "http://m:9/metrics"
    assert metrics_url("", "http://h/v1") is None
    assert metrics_url("auto", None) is None


def test_slow_start_doubles_then_a_saturation_ends_it() -> None:
    c, carried = controller()
    assert c.limit == 2
    for expected in (4, 8, 16):
        busy(c, carried)
        assert c.tick() == "increase"
        assert c.limit == expected
    busy(c, carried)
    c.load(Load(running=12, waiting=1, kv_usage=None))
    c.load(Load(running=12, waiting=4, kv_usage=None))  # the fewer of two readings: 1
    assert c.tick() == "decrease"
    assert c.limit == 14  # 16 in flight x (12 running + 0 allowed) / (12 + 1), floored
    assert not c.slow_start
    carried.count = 14
    c.started()
    c.load(Load(running=12, waiting=0, kv_usage=None))
    assert c.tick() == "increase"
    assert c.limit == 15  # near where it broke: probing by one


def test_one_reading_of_a_request_waiting_is_not_a_queue() -> None:
    c, carried = controller()
    c.slow_start = False
    c._limit = 10.0
    for waiting in (0, 3, 0, 3):  # a request caught between steps, now and then
        busy(c, carried)
        c.load(Load(running=10, waiting=waiting, kv_usage=0.4))
        assert c.tick() == "increase"
    busy(c, carried)
    c.load(Load(running=10, waiting=2, kv_usage=0.4))
    assert c.tick() == "decrease"  # two readings in a row: a queue


def test_a_limit_not_in_use_is_not_cut_by_what_the_server_says() -> None:
    """4 in flight under a limit of 8: requests caught mid-step in two readings, or slower
    tokens, are not the limit's doing; cutting it would only queue the next burst here."""
    c, carried = controller(min_c=2, max_c=64)
    c.slow_start = False
    c._limit = 8.0
    for _ in range(3):
        c.latency(100, tpot=0.02)
    carried.count = 4
    c.started()
    c.load(Load(running=3, waiting=1, kv_usage=0.1))
    c.tick()
    for _ in range(3):
        c.latency(100, tpot=0.08)
    c.load(Load(running=3, waiting=1, kv_usage=0.1))
    c.started()
    assert c.tick() is None
    assert c.limit == 8


def test_a_few_waiting_that_the_kv_cache_has_room_for_are_between_steps() -> None:
    """At many requests a second some are always between steps: one or two waiting with room
    in the cache, in reading after reading, are no queue; more than a tenth of the batch, or
    more than the cache has room for, is one."""
    c, carried = controller(min_c=2, max_c=256)
    c.slow_start = False
    c._limit = 100.0
    for _ in range(3):
        busy(c, carried)
        c.load(Load(running=80, waiting=2, kv_usage=0.5))  # room for 80 more
        assert c.tick() == "increase"
    busy(c, carried)
    c.load(Load(running=80, waiting=12, kv_usage=0.5))
    busy(c, carried)
    c.load(Load(running=80, waiting=12, kv_usage=0.5))
    assert c.tick() == "decrease"


def test_lower_tiers_using_all_they_may_raise_the_limit() -> None:
    """A lower tier stops at the limit less its headroom: that is the limit in use, so it is
    raised (else a gateway whose top tier is idle stays at min_concurrency for ever)."""
    c, carried = controller(min_c=10, max_c=64, headroom=0.1)
    c.slow_start = False
    carried.count = c.below_top  # 9 of 10: all the lower tiers may have
    c.started()
    assert c.tick() == "increase"
    assert c.limit > 10


def test_an_unused_limit_is_not_raised() -> None:
    c, carried = controller(min_c=4)
    carried.count = 1
    c.started()
    assert c.tick() is None
    assert c.limit == 4


def test_a_full_kv_cache_holds_the_limit() -> None:
    c, carried = controller()
    busy(c, carried)
    c.load(Load(running=2, waiting=0, kv_usage=0.99))
    assert c.tick() is None
    assert c.limit == 2
    assert c.reason == "KV cache full"


def test_the_limit_stays_within_what_the_kv_cache_holds() -> None:
    """40 running fill 80% of the cache: it holds 50. A limit above that is cut to it (the
    rest would queue on the server, where the highest priority cannot pass them), and raised
    no further while the cache says so; lower tiers then leave the headroom free in the cache."""
    c, carried = controller(min_c=2, max_c=128, headroom=0.1)
    c._limit = 64.0
    busy(c, carried)
    c.load(Load(running=40, waiting=0, kv_usage=0.8))
    assert c.tick() == "decrease"
    assert c.limit == 50
    assert not c.slow_start
    assert c.below_top == 45  # 5 of the 50 the cache holds are the highest priority's
    carried.count = 45
    c.started()
    c.load(Load(running=45, waiting=0, kv_usage=0.9))
    assert c.tick() is None  # in use, but all the cache holds
    assert c.limit == 50
    c.load(Load(running=45, waiting=0, kv_usage=0.75))  # shorter requests now: 60 fit
    carried.count = 45
    c.started()
    assert c.tick() == "increase"
    assert 50 < c.limit <= 60


def test_a_cache_less_than_half_full_does_not_cap_the_limit() -> None:
    c, carried = controller(min_c=8, max_c=64)
    busy(c, carried)
    c.load(Load(running=8, waiting=0, kv_usage=0.4))
    assert c.tick() == "increase"
    assert c.limit == 16


def test_a_full_answer_cuts_at_once_but_not_again_while_draining() -> None:
    c, carried = controller(min_c=2, max_c=64)
    for _ in range(5):
        busy(c, carried)
        c.tick()
    assert c.limit == 64
    carried.count = 64
    assert c.overloaded()
    assert c.limit == 48  # x0.75
    assert not c.overloaded()  # 64 still in flight over 48: the cut is draining
    assert c.limit == 48
    carried.count = 40
    assert c.overloaded()
    assert c.limit == 30  # of what is in flight


def test_never_below_min_nor_above_max() -> None:
    c, carried = controller(min_c=3, max_c=10)
    for _ in range(10):
        busy(c, carried)
        c.tick()
    assert c.limit == 10
    for _ in range(20):
        carried.count = min(carried.count, c.limit)
        c.overloaded()
    assert c.limit == 3
    c.resize(5, 8)
    assert c.limit == 5


def test_recovers_after_the_server_recovers() -> None:
    c, carried = controller(min_c=2, max_c=100)
    c.slow_start = False
    c.ceiling = 80.0
    for _ in range(12):
        busy(c, carried)
        c.tick()
    assert 30 <= c.limit <= 60  # sqrt steps far below where it last broke
    for _ in range(20):
        busy(c, carried)
        c.tick()
    assert c.limit >= 80


def test_latency_far_above_its_baseline_is_saturation() -> None:
    c, carried = controller(latency_tolerance=2.0)
    c.slow_start = False
    c._limit = 20.0
    for _ in range(3):
        c.latency(100, ttft=0.05, tpot=0.02)
    busy(c, carried)
    assert c.tick() == "increase"  # the baseline
    for _ in range(3):
        c.latency(100, ttft=0.06, tpot=0.03)  # 1.5x: within tolerance
    busy(c, carried)
    assert c.tick() == "increase"
    limit = c.limit
    for _ in range(3):
        c.latency(100, ttft=0.05, tpot=0.05)  # 2.5x per output token
    busy(c, carried)
    assert c.tick() == "decrease"
    assert c.limit == int(limit * 0.75)
    assert "time per output token" in c.reason


def test_first_token_time_is_not_judged_where_the_metrics_count_the_servers_queue() -> None:
    """When a request arrives within a decode step swings its first token by a step: with a
    queue count in the metrics (nothing waiting), a later first token is no cut; a slower
    token after it still is."""
    c, carried = controller(latency_tolerance=2.0)
    c.slow_start = False
    c._limit = 20.0
    for _ in range(3):
        c.latency(100, ttft=0.05, tpot=0.02)
    c.load(Load(running=2, waiting=0, kv_usage=0.1))
    busy(c, carried)
    assert c.tick() == "increase"
    for _ in range(3):
        c.latency(100, ttft=0.2, tpot=0.03)  # first tokens 4x later, tokens 1.5x slower
    c.load(Load(running=18, waiting=0, kv_usage=0.3))
    busy(c, carried)
    assert c.tick() == "increase"
    for _ in range(3):
        c.latency(100, ttft=0.05, tpot=0.05)  # 2.5x per token: a batch past the knee
    busy(c, carried)
    assert c.tick() == "decrease"
    assert "time per output token" in c.reason


def test_time_to_first_token_is_compared_within_a_prompt_size() -> None:
    """Long prompts take longer to the first token: no saturation from mixing sizes."""
    c, carried = controller()
    c.slow_start = False
    c._limit = 20.0
    for _ in range(3):
        c.latency(10, ttft=0.02)
    busy(c, carried)
    c.tick()
    for _ in range(3):
        c.latency(20_000, ttft=0.5)  # 25x the short ones, but its own first figure
    busy(c, carried)
    assert c.tick() == "increase"


@pytest.mark.parametrize(
    ("headroom", "limit", "below"), [(0.1, 20, 18), (0.1, 5, 4), (0.0, 20, 20)]
)
def test_lower_tiers_are_held_back_by_the_headroom(headroom: float, limit: int, below: int) -> None:
    c, _ = controller(min_c=limit, max_c=limit, headroom=headroom)
    assert c.limit == limit
    assert c.below_top == below

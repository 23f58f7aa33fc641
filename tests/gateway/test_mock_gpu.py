"""The mock's simulated GPU (``quotagate mock --gpu``): the engine's state machine with figures
worked out by hand, its asyncio driver, the HTTP app in process, and one real server process
read through its ``/metrics`` and the ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from helpers import in_process, metric_samples, sample, sse_events, stream_then_disconnect
from quotagate.cli import main
from quotagate.gateway.backends.gpu import (
    Generation,
    GpuModel,
    GpuOptions,
    GpuServer,
    GpuStopped,
    Refusal,
    Sequence,
)
from quotagate.gateway.backends.mock import NATURAL_LENGTH, create_mock_app, mock_text
from quotagate.gateway.tokens import prompt_tokens
from quotagate.testing import async_wait_until, wait_until
from support import QuotagateProcess

#: kv 10000, a full batch decodes 1000 tokens/s, a step is at least 20 ms: the knee is a batch
#: of 20; prefill runs at 10 x 1000 tokens/s.
SMALL = GpuOptions(kv_tokens=10_000, tokens_per_second=1000, step_ms=20)
#: Steps of a millisecond: answers of a few tokens come in a few milliseconds.
FAST = GpuOptions(kv_tokens=10_000, tokens_per_second=1_000_000, step_ms=1)


def queued(model: GpuModel, prompt: int, output: int) -> Sequence:
    sequence = model.submit(prompt, output)
    assert isinstance(sequence, Sequence), sequence
    return sequence


def generation_of(server: GpuServer, prompt: int, output: int, n: int = 1) -> Generation:
    generation = server.submit(prompt, output, n)
    assert isinstance(generation, Generation), generation
    return generation


# --- the engine: steps -----------------------------------------------------------------------


def test_a_step_costs_step_ms_up_to_the_knee_then_a_token_per_sequence_at_full_throughput() -> None:
    assert SMALL.knee == 20
    for batch, duration in ((1, 0.020), (10, 0.020), (20, 0.020), (40, 0.040), (100, 0.100)):
        model = GpuModel(SMALL)
        for _ in range(batch):
            queued(model, 0, 2)  # no prompt: no prefill, decode alone
        step = model.begin_step()
        assert step is not None
        assert (len(step.admitted), len(step.batch)) == (batch, batch)
        assert step.duration == pytest.approx(duration)
        ended = model.end_step()
        assert len(ended.tokens) == batch
        # Aggregate throughput: 50 tokens/s for one, 500 for 10, 1000 from the knee on.
        assert len(ended.tokens) / step.duration == pytest.approx(min(batch, 20) * 50)


def test_the_admitting_step_pays_the_prefill_of_what_it_admitted() -> None:
    model = GpuModel(SMALL)
    sequences = [queued(model, 100, 3) for _ in range(10)]
    first = model.begin_step()
    assert first is not None
    assert first.duration == pytest.approx(0.020 + 1000 / 10_000)  # 10 prompts of 100
    model.end_step()
    second = model.begin_step()
    assert second is not None
    assert second.admitted == ()
    assert second.duration == pytest.approx(0.020)
    model.end_step()
    late = queued(model, 500, 3)
    third = model.begin_step()
    assert third is not None
    assert third.admitted == (late,)
    assert third.batch == (*sequences, late)
    assert third.duration == pytest.approx(0.020 + 500 / 10_000)  # the batch waits for it

    slow_prefill = GpuModel(GpuOptions(tokens_per_second=1000, prefill_tokens_per_second=500))
    queued(slow_prefill, 1000, 1)
    step = slow_prefill.begin_step()
    assert step is not None
    assert step.duration == pytest.approx(0.020 + 2.0)


def test_each_sequence_gets_one_token_a_step_and_finishes_freeing_its_kv() -> None:
    model = GpuModel(SMALL)
    short, long = queued(model, 10, 2), queued(model, 20, 3)
    assert (model.waiting, model.running, model.reserved) == (2, 0, 0)
    assert model.begin_step() is not None
    assert (model.waiting, model.running, model.reserved) == (0, 2, 12 + 23)
    assert model.kv_usage == pytest.approx(35 / 10_000)
    first = model.end_step()
    assert first.tokens == (short, long)  # the first token ends the admitting step
    assert first.finished == ()
    assert (short.generated, long.generated) == (1, 1)
    model.begin_step()
    second = model.end_step()
    assert second.finished == (short,)
    assert short.state == "finished"
    assert (model.running, model.reserved) == (1, 23)
    model.begin_step()
    third = model.end_step()
    assert (third.tokens, third.finished) == ((long,), (long,))
    assert (model.running, model.reserved, model.kv_usage) == (0, 0, 0.0)
    assert model.idle
    assert model.begin_step() is None
    assert model.prompt_tokens_total == 30
    assert model.generation_tokens_total == 5
    assert model.requests_finished_total == 2


def test_admission_is_first_in_first_out_and_a_big_head_blocks_the_queue() -> None:
    model = GpuModel(GpuOptions(kv_tokens=100, tokens_per_second=1000, step_ms=20))
    a = queued(model, 50, 10)  # reserves 60
    b = queued(model, 30, 20)  # 50: not with a (110 > 100)
    c = queued(model, 5, 5)  # 10: would fit beside a, but waits behind b
    step = model.begin_step()
    assert step is not None
    assert step.admitted == (a,)
    assert step.duration == pytest.approx(0.020 + 50 / 10_000)
    assert (model.running, model.waiting, model.kv_usage) == (1, 2, 0.6)
    model.end_step()
    for _ in range(9):  # a's tokens 2 to 10: b and c wait all along
        model.begin_step()
        ended = model.end_step()
        assert (b.state, c.state, model.waiting) == ("waiting", "waiting", 2)
    assert ended.finished == (a,)
    assert model.reserved == 0
    step = model.begin_step()
    assert step is not None
    assert step.admitted == (b, c)
    assert step.duration == pytest.approx(0.020 + 35 / 10_000)
    assert model.kv_usage == pytest.approx(0.6)
    assert model.prompt_tokens_total == 85


def test_abort_frees_at_once_a_waiting_or_a_running_sequence() -> None:
    model = GpuModel(GpuOptions(kv_tokens=100, tokens_per_second=1000, step_ms=20))
    a, b, c = queued(model, 50, 10), queued(model, 30, 20), queued(model, 5, 5)
    model.begin_step()
    model.end_step()
    assert model.abort(b)  # the blocking head leaves the queue: c is next
    assert (b.state, model.waiting) == ("aborted", 1)
    assert not model.abort(b)
    step = model.begin_step()
    assert step is not None
    assert step.admitted == (c,)
    assert model.reserved == 70
    assert model.abort(a)  # running, during a step: its KV is free now...
    assert (model.running, model.reserved) == (1, 10)
    ended = model.end_step()
    assert ended.tokens == (c,)  # ...and it gets no token from the step
    assert a.generated == 1
    assert model.requests_aborted_total == 2
    assert model.generation_tokens_total == 2  # a's first, c's first


def test_a_submit_above_max_queued_is_refused_with_vllms_503() -> None:
    model = GpuModel(GpuOptions(kv_tokens=100, max_queued=2))
    queued(model, 50, 10)  # 60: the next step admits it
    b = queued(model, 30, 20)  # 50: waits for room (60 + 50 > 100)
    queued(model, 1, 1)  # behind b, waits too: two wait for room
    refused = model.submit(1, 1)
    assert isinstance(refused, Refusal)
    assert (refused.reason, refused.status) == ("queue_full", 503)
    assert refused.body() == {
        "error": {
            "message": refused.message,
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    }
    assert "the queue for room in the KV cache is full (2 of 2)" in refused.message
    assert model.waiting == 3  # nothing changed
    model.begin_step()
    model.end_step()
    assert model.waiting == 2
    assert model.refusal(1, 1) is not None  # b and the one behind it still wait
    model.abort(b)  # the one behind fits now (60 + 2): nothing waits for room
    assert model.refusal(1, 1) is None
    assert model.refusal(30, 20) is None  # 50 > 38 left: it would be the one waiting
    assert model.refusal(30, 20, n=3) is not None  # three would


def test_max_queued_never_refuses_a_burst_the_kv_cache_can_take() -> None:
    model = GpuModel(GpuOptions(kv_tokens=100, max_queued=1))
    for _ in range(5):
        queued(model, 10, 10)  # 5 x 20 = 100: all five fit at the next step
    assert model.waiting == 5
    queued(model, 10, 10)  # the sixth waits for room: one may
    assert isinstance(model.submit(10, 10), Refusal)
    step = model.begin_step()
    assert step is not None
    assert (len(step.admitted), model.waiting) == (5, 1)


def test_a_sequence_larger_than_the_kv_cache_is_refused_with_400() -> None:
    model = GpuModel(GpuOptions(kv_tokens=100))
    refused = model.submit(60, 41)
    assert isinstance(refused, Refusal)
    assert (refused.reason, refused.status) == ("too_large", 400)
    assert refused.body()["error"]["type"] == "BadRequestError"  # type: ignore[index]
    assert "maximum context length is 100 tokens" in refused.message
    assert "you requested 101 tokens (60 in the messages, 41 in the completion)" in refused.message
    assert model.waiting == 0
    exact = queued(model, 60, 40)
    model.begin_step()
    assert (exact.state, model.kv_usage) == ("running", 1.0)


def test_steps_alternate_and_bad_figures_are_named() -> None:
    model = GpuModel(SMALL)
    with pytest.raises(RuntimeError, match="no step"):
        model.end_step()
    queued(model, 1, 1)
    model.begin_step()
    with pytest.raises(RuntimeError, match="in progress"):
        model.begin_step()
    assert GpuOptions().prefill_rate == 40_000
    for field, value in (
        ("kv_tokens", 0),
        ("tokens_per_second", 0),
        ("step_ms", -1),
        ("prefill_tokens_per_second", 0),
        ("max_queued", 0),
    ):
        with pytest.raises(ValueError, match=f"^{field}: expected .*, got {value}$"):
            GpuOptions(**{field: value})


# --- the driver ------------------------------------------------------------------------------


async def test_the_driver_delivers_each_choice_in_order_then_sleeps_while_idle() -> None:
    async with GpuServer(FAST) as server:
        steps = 0
        begin = server.model.begin_step

        def counted() -> Any:
            nonlocal steps
            steps += 1
            return begin()

        server.model.begin_step = counted  # type: ignore[method-assign]
        generation = generation_of(server, 5, 4, n=2)
        got = [item async for item in generation]
        assert sorted(got) == [(c, p) for c in (0, 1) for p in range(1, 5)]
        for choice in (0, 1):
            assert [p for c, p in got if c == choice] == [1, 2, 3, 4]
        assert server.model.idle
        assert server.model.requests_finished_total == 2
        await async_wait_until(lambda: steps == 5, 2, "the idle step (None) after the last")
        await asyncio.sleep(0.05)  # a busy loop would begin hundreds of steps meanwhile
        assert steps == 5


async def test_a_consumer_gone_aborts_and_closing_ends_generations_in_progress() -> None:
    server = GpuServer(GpuOptions(kv_tokens=100, tokens_per_second=1000, step_ms=5))
    await server.start()
    first = generation_of(server, 10, 80)
    second = generation_of(server, 10, 80)  # waits: 90 + 90 > 100

    async def read_one() -> None:
        async for _ in first:
            await asyncio.Event().wait()  # the client stalls, then is cancelled

    reader = asyncio.ensure_future(read_one())
    await async_wait_until(lambda: first.sequences[0].generated >= 1, 5, "a first token")
    assert server.model.waiting == 1
    reader.cancel()
    first.abort()  # what the HTTP layer's finally does
    await async_wait_until(lambda: server.model.running == 1, 5, "the second admitted")
    assert second.sequences[0].state == "running"
    await server.aclose()
    assert server.model.reserved == 0
    with pytest.raises(GpuStopped):
        await second.wait()
    async with server:  # it starts again, with an empty engine
        assert [item async for item in generation_of(server, 1, 2)] == [(0, 1), (0, 2)]


# --- HTTP, in process ------------------------------------------------------------------------


def _stable(event: str) -> Any:
    """An SSE payload without its id and creation time (they differ from run to run)."""
    if event == "[DONE]":
        return event
    payload = json.loads(event)
    return {k: v for k, v in payload.items() if k not in ("id", "created")}


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}]}
COMPLETION = {"model": "m", "prompt": "Say hi"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3}),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        (
            "/v1/completions",
            {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/completions", {**COMPLETION, "max_tokens": 100}),
    ],
)
async def test_one_choice_answers_exactly_as_the_plain_mock(
    path: str, body: dict[str, Any]
) -> None:
    plain = create_mock_app(models=("m",), output_tokens=6)
    gpu = create_mock_app(models=("m",), output_tokens=6, gpu=FAST)
    async with in_process(plain) as a, in_process(gpu) as b:
        expected, got = await a.post(path, json=body), await b.post(path, json=body)
    assert got.status_code == expected.status_code == 200
    if body.get("stream"):
        assert [_stable(e) for e in sse_events(got.text)] == [
            _stable(e) for e in sse_events(expected.text)
        ]
    else:
        assert _answer(got.json()) == _answer(expected.json())


async def test_n_choices_are_n_sequences_each_streaming_its_own_events() -> None:
    app = create_mock_app(models=("m",), gpu=FAST)
    body = {
        **CHAT,
        "n": 3,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with in_process(app) as client:
        response = await client.post("/v1/chat/completions", json=body)
        metrics = metric_samples((await client.get("/metrics")).text)
    events = [json.loads(e) for e in sse_events(response.text)[:-1]]
    opening = events[0]["choices"]
    assert [c["delta"] for c in opening] == [{"role": "assistant", "content": ""}] * 3
    for index in range(3):
        mine = [e["choices"][0] for e in events[1:-1] if e["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == "".join(mock_text(4))
        assert mine[-1]["finish_reason"] == "length"
    prompt = prompt_tokens("chat", body)
    assert events[-1]["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 12,
        "total_tokens": prompt + 12,
    }
    labels = {"model_name": "m", "engine": "0"}
    assert sample(metrics, "vllm:prompt_tokens_total", **labels) == 3 * prompt
    assert sample(metrics, "vllm:generation_tokens_total", **labels) == 12
    assert sample(metrics, "vllm:request_success_total", finished_reason="length", **labels) == 3


async def test_the_503_above_max_queued_and_the_400_above_the_kv_cache() -> None:
    options = GpuOptions(kv_tokens=100, tokens_per_second=1000, step_ms=50, max_queued=1)
    app = create_mock_app(models=("m",), output_tokens=60, gpu=options)
    async with in_process(app) as client:
        server: GpuServer = app.state.gpu
        held = [generation_of(server, 30, 60), generation_of(server, 30, 60)]  # one waits
        refused = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5})
        for generation in held:
            generation.abort()
        fits = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5})
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert list(refused.json()) == ["error"]
    assert (error["type"], error["param"], error["code"]) == ("ServiceUnavailableError", None, 503)
    assert fits.status_code == 200  # the queue is empty again
    big = create_mock_app(models=("m",), output_tokens=200, gpu=options)
    async with in_process(big) as client:
        too_large = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 150})
    assert too_large.status_code == 400
    error = too_large.json()["error"]
    assert (error["type"], error["code"]) == ("BadRequestError", 400)
    prompt = prompt_tokens("completions", COMPLETION)
    assert (
        f"{prompt + 150} tokens ({prompt} in the messages, 150 in the completion)"
        in (error["message"])
    )


async def test_a_client_gone_mid_stream_frees_its_kv() -> None:
    app = create_mock_app(models=("m",), output_tokens=500, gpu=GpuOptions(step_ms=5))
    async with in_process(app):
        server: GpuServer = app.state.gpu
        body = {**COMPLETION, "stream": True}
        received = await stream_then_disconnect(app, "/v1/completions", body, "-", events=3)
        assert len(sse_events(b"".join(received).decode())) >= 3
        assert (server.model.reserved, server.model.running) == (0, 0)
        assert server.model.requests_aborted_total == 1


async def test_a_client_gone_before_a_whole_answer_frees_its_kv() -> None:
    app = create_mock_app(models=("m",), output_tokens=500, gpu=GpuOptions(step_ms=5))
    server: GpuServer = app.state.gpu
    data = json.dumps(COMPLETION).encode()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("mock.test", 80),
    }
    async with in_process(app):
        call = asyncio.ensure_future(app(scope, receive, send))
        await async_wait_until(lambda: server.model.generation_tokens_total >= 2, 5, "tokens")
        gone.set()
        await asyncio.wait_for(call, 5)
        assert (server.model.reserved, server.model.requests_aborted_total) == (0, 1)
        assert server.model.requests_finished_total == 0


async def test_without_gpu_the_mock_is_unchanged_but_its_length_is_settable() -> None:
    async with in_process(create_mock_app(output_tokens=3)) as client:
        assert (await client.get("/metrics")).status_code == 404
        short = (await client.post("/v1/completions", json=COMPLETION)).json()
        capped = (await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})).json()
    assert short["choices"][0]["text"] == "".join(mock_text(3))
    assert short["choices"][0]["finish_reason"] == "stop"
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 2


def test_the_cli_flags_say_the_defaults_and_refuse_what_makes_no_sense() -> None:
    runner = CliRunner()
    shown = " ".join(runner.invoke(main, ["mock", "--help"]).output.split())
    defaults = GpuOptions()
    for flag, default in (
        ("--kv-tokens", f"default {defaults.kv_tokens}"),
        ("--tokens-per-second", f"default {defaults.tokens_per_second:g}"),
        ("--step-ms", f"default {defaults.step_ms:g}"),
        ("--output-tokens", f"default {NATURAL_LENGTH}"),
        ("--max-queued", "default: no limit"),
    ):
        assert flag in shown, flag
        assert default in shown, (flag, default)
    for argv, message in (
        (["--kv-tokens", "5"], "--kv-tokens: only with --gpu"),
        (["--max-queued", "3", "--step-ms", "5"], "--step-ms, --max-queued: only with --gpu"),
        (["--gpu", "--tokens-per-second", "0"], "must be above 0 with --gpu"),
        (["--gpu", "--kv-tokens", "0"], "0 is not in the range x>=1"),
        (["--gpu", "--max-queued", "-1"], "-1 is not in the range x>=1"),
        (["--output-tokens", "0"], "0 is not in the range x>=1"),
    ):
        done = runner.invoke(main, ["mock", *argv])
        assert done.exit_code == 2, (argv, done.output)
        assert message in " ".join(done.output.split()), (argv, done.output)


# --- a real server ---------------------------------------------------------------------------

#: One answer at a time: each reserves 1 + 1000 of 1500 tokens, and takes 20 s (a step of 20
#: ms a token) unless its client goes away.
REAL = ("--kv-tokens", "1500", "--tokens-per-second", "1000", "--max-queued", "2")


@pytest.fixture(scope="module")
def gpu_mock() -> Iterator[QuotagateProcess]:
    args = ("mock", "--gpu", *REAL, "--output-tokens", "1000", "--model", "m", "--port", "{port}")
    with QuotagateProcess(*args, name="gpu-mock") as process:
        yield process


def _scrape(process: QuotagateProcess) -> dict[str, float]:
    text = httpx.get(f"{process.url}/metrics", timeout=5).text
    samples = metric_samples(text)
    labels = {"model_name": "m", "engine": "0"}
    return {
        name: sample(samples, f"vllm:{name}", **labels)
        for name in (
            "num_requests_running",
            "num_requests_waiting",
            "kv_cache_usage_perc",
            "gpu_cache_usage_perc",
        )
    } | {
        "aborted": sample(samples, "vllm:request_success_total", finished_reason="abort", **labels)
    }


def test_a_real_server_queues_what_its_kv_cannot_hold_and_refuses_past_max_queued(
    gpu_mock: QuotagateProcess,
) -> None:
    assert prompt_tokens("completions", {"prompt": "hi"}) == 1
    body = {"model": "m", "prompt": "hi", "stream": True}
    with httpx.Client(base_url=gpu_mock.url, timeout=10) as client, ExitStack() as streams:
        for _ in range(3):
            response = streams.enter_context(client.stream("POST", "/v1/completions", json=body))
            assert response.status_code == 200
        wait_until(
            lambda: _scrape(gpu_mock)["num_requests_waiting"] == 2, 10, "two requests waiting"
        )
        state = _scrape(gpu_mock)
        assert state["num_requests_running"] == 1
        assert state["kv_cache_usage_perc"] == state["gpu_cache_usage_perc"] == 1001 / 1500
        refused = client.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
    # The clients went away: the server aborts all three and frees their KV.
    wait_until(lambda: _scrape(gpu_mock)["aborted"] == 3, 10, "three aborted")
    state = _scrape(gpu_mock)
    assert (state["num_requests_running"], state["num_requests_waiting"]) == (0, 0)
    assert state["kv_cache_usage_perc"] == 0


def test_the_openai_sdk_streams_from_a_real_server(gpu_mock: QuotagateProcess) -> None:
    client = openai.OpenAI(base_url=f"{gpu_mock.url}/v1", api_key="-", max_retries=0)
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(mock_text(5))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5

"""A simulated GPU for the mock model: continuous batching, a KV cache, vLLM's ``/metrics``.

``quotagate mock --gpu`` answers like one vLLM replica on one GPU, so that a gateway's
adaptive concurrency, its fairness and a deployment's size can be measured on a laptop. The
model is small enough to compute by hand, and it is two pieces:

- ``GpuModel``: a pure, synchronous state machine with no clock and no I/O. Tests drive it
  step by step and assert exact figures.
- ``GpuServer``: its asyncio driver, which runs the steps in real time and hands each
  request's tokens to whoever awaits them.

The engine, step by step (vLLM's continuous batching, much simplified):

1. **Admission**, at the start of each step: waiting sequences are admitted first in, first
   out while ``reserved + prompt + output <= kv_tokens``. A sequence reserves its prompt and
   every output token it will generate, so nothing is ever preempted. The head of the queue
   blocks the ones behind it even when a smaller one would fit (vLLM's FCFS policy does the
   same). A sequence larger than the whole KV cache is refused when submitted (400).
2. **Duration**: ``max(step_ms / 1000, batch / tokens_per_second) + admitted_prompt /
   prefill_tokens_per_second``. A lone sequence decodes at ``1000 / step_ms`` tokens a
   second; up to the knee (``batch = tokens_per_second * step_ms / 1000``) a step costs the
   same whatever the batch, so throughput grows with it; beyond, throughput stays at
   ``tokens_per_second`` and every sequence slows as the batch grows. Prefill (the prompts
   admitted this step) is paid by the whole batch, as without chunked prefill.
3. **Tokens**, at the end of the step: each sequence in the batch gets exactly one. The first
   comes at the end of the step that admitted it, so time to first token is the wait in the
   queue plus that step. A sequence with all its tokens finishes and frees its KV then.

A sequence can be aborted at any time (the client went away): it leaves the queue or the
batch and frees its KV at once; it gets no token from the step in progress.

``max_queued``: a submit that would make more than this many sequences wait for room in the
KV cache is refused (503, ``ServiceUnavailableError``), as vLLM's ``--max-num-queued-reqs``
refuses an overloaded engine. It counts the sequences the next step could not admit as things
stand (FIFO: the first that does not fit and all behind it), so a burst that arrives at an
engine with room is never refused. The ``waiting`` gauge counts every sequence in the queue:
like vLLM's ``num_requests_waiting``, it includes those that arrived during the step in
progress, which the next step admits.

``kv_usage`` is the reserved fraction (0 to 1): it rises when a sequence is admitted, not as
it writes its tokens, so it shows the load the engine has committed to.

What it leaves out: chunked prefill, prefix caching (``n`` choices are ``n`` sequences, each
with its own prompt, as the gateway reserves them: ``(prompt + output) x n``), a cap on the
batch size (``max_num_seqs``), preemption, and the per-request histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Self

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "FinishReason",
    "Generation",
    "GpuModel",
    "GpuOptions",
    "GpuServer",
    "GpuStopped",
    "Refusal",
    "Sequence",
    "Step",
    "StepEnd",
    "render_metrics",
]

FinishReason = Literal["stop", "length"]
SequenceState = Literal["waiting", "running", "finished", "aborted"]

#: The driver restarts its schedule when it is this late (seconds): a paused process resumes
#: at the normal pace instead of generating the steps it missed in a burst.
_MAX_LAG = 0.25


@dataclass(frozen=True, slots=True)
class GpuOptions:
    """The simulated GPU's figures (see the module docstring for the model).

    Args:
        kv_tokens: the KV cache, in tokens: prompt + output of every sequence in the batch.
        tokens_per_second: decode throughput of a full batch (all sequences together).
        step_ms: the shortest decode step; a lone sequence gets ``1000 / step_ms`` tokens/s.
        prefill_tokens_per_second: prompt tokens processed a second (None: 10 x
            ``tokens_per_second``).
        max_queued: refuse (503) a submit that would make more sequences wait for KV room;
            None: never.

    Raises:
        ValueError: a figure out of range (the message names it and its value).
    """

    kv_tokens: int = 200_000
    tokens_per_second: float = 4000.0
    step_ms: float = 20.0
    prefill_tokens_per_second: float | None = None
    max_queued: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("kv_tokens", self.kv_tokens, self.kv_tokens >= 1),
            ("tokens_per_second", self.tokens_per_second, self.tokens_per_second > 0),
            ("step_ms", self.step_ms, self.step_ms > 0),
            (
                "prefill_tokens_per_second",
                self.prefill_tokens_per_second,
                self.prefill_tokens_per_second is None or self.prefill_tokens_per_second > 0,
            ),
            ("max_queued", self.max_queued, self.max_queued is None or self.max_queued >= 1),
        )
        for name, value, ok in checks:
            if not ok:
                least = "at least 1" if name in ("kv_tokens", "max_queued") else "above 0"
                raise ValueError(f"{name}: expected {least}, got {value!r}")

    @property
    def prefill_rate(self) -> float:
        """Prompt tokens processed a second."""
        if self.prefill_tokens_per_second is None:
            return 10 * self.tokens_per_second
        return self.prefill_tokens_per_second

    @property
    def knee(self) -> float:
        """The batch size from which the step lengthens (throughput is at its maximum)."""
        return self.tokens_per_second * self.step_ms / 1000


@dataclass(eq=False, slots=True)
class Sequence:
    """One sequence in the engine: a request's choice, from submit to finish or abort."""

    id: int
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason = "length"
    generated: int = 0
    state: SequenceState = "waiting"

    @property
    def reserved(self) -> int:
        """Its KV reservation: the prompt and every token it will generate."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Refusal:
    """A submit the engine refused, and the HTTP answer it gets (vLLM's error body)."""

    reason: Literal["too_large", "queue_full"]
    message: str

    @property
    def status(self) -> int:
        return 400 if self.reason == "too_large" else 503

    def body(self) -> dict[str, object]:
        """vLLM's ``ErrorResponse`` (since 0.10; before, the same fields were not nested)."""
        kind = "BadRequestError" if self.reason == "too_large" else "ServiceUnavailableError"
        return {
            "error": {"message": self.message, "type": kind, "param": None, "code": self.status}
        }


@dataclass(frozen=True, slots=True)
class Step:
    """A step begun: how long it takes and what it runs."""

    duration: float
    """Seconds, from admission to its tokens."""
    admitted: tuple[Sequence, ...]
    """Admitted from the queue at its start (their prompts are prefilled in it)."""
    batch: tuple[Sequence, ...]
    """Every sequence it runs (the admitted ones included)."""


@dataclass(frozen=True, slots=True)
class StepEnd:
    """A step ended: who got a token and who finished."""

    tokens: tuple[Sequence, ...]
    """One token each (the batch, less the sequences aborted during the step)."""
    finished: tuple[Sequence, ...]
    """Got their last token; their KV is free."""


class GpuModel:
    """The engine as a state machine: ``submit``, then ``begin_step`` / ``end_step`` in turn.

    No clock: a step's duration is returned, and the caller decides when it ends.
    """

    def __init__(self, options: GpuOptions | None = None) -> None:
        self.options = options or GpuOptions()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._reserved = 0
        self._step: Step | None = None
        self._next_id = 0
        self.prompt_tokens_total = 0
        """Prompt tokens prefilled (counted at admission)."""
        self.generation_tokens_total = 0
        """Tokens generated (aborted sequences' included)."""
        self.requests_finished: dict[FinishReason, int] = {"stop": 0, "length": 0}
        """Sequences that got all their tokens, by finish reason."""
        self.requests_aborted_total = 0

    # --- state ---------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Sequences in the batch."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Sequences in the queue."""
        return len(self._waiting)

    @property
    def reserved(self) -> int:
        """KV tokens reserved by the batch."""
        return self._reserved

    @property
    def kv_usage(self) -> float:
        """The reserved fraction of the KV cache, 0 to 1."""
        return self._reserved / self.options.kv_tokens

    @property
    def requests_finished_total(self) -> int:
        return sum(self.requests_finished.values())

    @property
    def in_step(self) -> bool:
        """A step has begun and not ended."""
        return self._step is not None

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing waits."""
        return not self._running and not self._waiting

    # --- requests ------------------------------------------------------------------------

    def refusal(self, prompt_tokens: int, output_tokens: int, n: int = 1) -> Refusal | None:
        """Why ``n`` sequences of this size would be refused now; None when they would not."""
        kv_tokens = self.options.kv_tokens
        needed = prompt_tokens + output_tokens
        if needed > kv_tokens:
            # vLLM's wording for a request longer than the model's context (which vLLM
            # refuses to start with more than the KV cache holds).
            return Refusal(
                "too_large",
                f"This model's maximum context length is {kv_tokens} tokens. However, you "
                f"requested {needed} tokens ({prompt_tokens} in the messages, {output_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
            )
        limit = self.options.max_queued
        if limit is not None and self._blocked(extra=(needed,) * n) > limit:
            return Refusal(
                "queue_full",
                f"The server is overloaded: the queue for room in the KV cache is full "
                f"({self._blocked()} of {limit}). Retry later or on another replica.",
            )
        return None

    def _blocked(self, extra: tuple[int, ...] = ()) -> int:
        """The waiting sequences (then ``extra`` reservations) the next step could not admit
        as things stand: those behind the first that does not fit (FIFO)."""
        room = self.options.kv_tokens - self._reserved
        reservations = [s.reserved for s in self._waiting] + list(extra)
        for admissible, reserved in enumerate(reservations):
            if reserved > room:
                return len(reservations) - admissible
            room -= reserved
        return 0

    def submit(
        self, prompt_tokens: int, output_tokens: int, finish_reason: FinishReason = "length"
    ) -> Sequence | Refusal:
        """Queue a sequence; it is admitted when a step starts and its KV fits.

        Args:
            prompt_tokens: its prompt (prefilled in the step that admits it).
            output_tokens: the tokens it generates (at least 1).
            finish_reason: what its request says when it finishes (counted by reason).

        Returns:
            The sequence (waiting), or why it was refused (nothing changed then).
        """
        if output_tokens < 1 or prompt_tokens < 0:
            raise ValueError(
                f"expected output >= 1 and prompt >= 0, got {output_tokens}, {prompt_tokens}"
            )
        if refusal := self.refusal(prompt_tokens, output_tokens):
            return refusal
        self._next_id += 1
        sequence = Sequence(self._next_id, prompt_tokens, output_tokens, finish_reason)
        self._waiting.append(sequence)
        return sequence

    def abort(self, sequence: Sequence) -> bool:
        """Drop it from the queue or the batch and free its KV now.

        Returns:
            Whether it was waiting or running (False: already finished or aborted).
        """
        if sequence.state == "waiting":
            self._waiting.remove(sequence)
        elif sequence.state == "running":
            del self._running[sequence.id]
            self._reserved -= sequence.reserved
        else:
            return False
        sequence.state = "aborted"
        self.requests_aborted_total += 1
        return True

    # --- steps ---------------------------------------------------------------------------

    def begin_step(self) -> Step | None:
        """Admit what fits, first in first out, and start a step.

        Returns:
            The step, or None when there is nothing to run (nothing runs and nothing waits:
            with an empty batch the head of the queue always fits).

        Raises:
            RuntimeError: the previous step has not ended.
        """
        if self._step is not None:
            raise RuntimeError("a step is in progress: end_step() first")
        kv_tokens = self.options.kv_tokens
        admitted: list[Sequence] = []
        while self._waiting and self._reserved + self._waiting[0].reserved <= kv_tokens:
            sequence = self._waiting.popleft()
            sequence.state = "running"
            self._running[sequence.id] = sequence
            self._reserved += sequence.reserved
            self.prompt_tokens_total += sequence.prompt_tokens
            admitted.append(sequence)
        if not self._running:
            return None
        options = self.options
        batch = tuple(self._running.values())
        decode = max(options.step_ms / 1000, len(batch) / options.tokens_per_second)
        prefill = sum(s.prompt_tokens for s in admitted) / options.prefill_rate
        self._step = Step(decode + prefill, tuple(admitted), batch)
        return self._step

    def end_step(self) -> StepEnd:
        """End the step in progress: a token for each sequence still in its batch.

        Raises:
            RuntimeError: no step is in progress.
        """
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("no step is in progress: begin_step() first")
        tokens: list[Sequence] = []
        finished: list[Sequence] = []
        for sequence in step.batch:
            if sequence.state != "running":
                continue  # aborted during the step
            sequence.generated += 1
            tokens.append(sequence)
            if sequence.generated == sequence.output_tokens:
                sequence.state = "finished"
                del self._running[sequence.id]
                self._reserved -= sequence.reserved
                self.requests_finished[sequence.finish_reason] += 1
                finished.append(sequence)
        self.generation_tokens_total += len(tokens)
        return StepEnd(tuple(tokens), tuple(finished))


# --- the driver ------------------------------------------------------------------------------


class GpuStopped(RuntimeError):
    """The simulator was closed while a generation was in progress."""


class Generation:
    """One request's ``n`` sequences as they generate.

    Async-iterate it for ``(choice, position)``: choice ``choice`` got its ``position``-th
    token (1-based; its last when ``position == output_tokens``). Choices advance each at its
    own pace (they may be admitted in different steps). ``abort()`` frees what is left;
    call it when the consumer goes away (a ``finally``): it does nothing once all finished.
    """

    def __init__(self, server: GpuServer, sequences: tuple[Sequence, ...]) -> None:
        self._server = server
        self.sequences = sequences
        self._tokens: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        self._left = sum(s.output_tokens for s in sequences)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[int, int]:
        if self._left == 0:
            raise StopAsyncIteration
        item = await self._tokens.get()
        if item is None:
            raise GpuStopped("the simulated GPU stopped during the generation")
        self._left -= 1
        return item

    async def wait(self) -> None:
        """Until every choice has all its tokens."""
        async for _ in self:
            pass

    def abort(self) -> None:
        for sequence in self.sequences:
            self._server._abort(sequence)

    def _deliver(self, item: tuple[int, int] | None) -> None:
        self._tokens.put_nowait(item)


class GpuServer:
    """Runs a ``GpuModel`` in real time on the event loop.

    One background task runs the steps back to back, each scheduled at the end of the one
    before (``start + sum of durations``, so lateness does not accumulate), and sleeps while
    the engine is idle. It is started by ``start()`` or by the first ``submit``; ``aclose()``
    stops it and ends every generation in progress with ``GpuStopped``.
    """

    def __init__(self, options: GpuOptions | None = None) -> None:
        self.model = GpuModel(options)
        self._owners: dict[int, tuple[Generation, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    async def start(self) -> None:
        self._ensure_started()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        owners, self._owners = self._owners, {}
        for generation in {g for g, _ in owners.values()}:
            for sequence in generation.sequences:
                self.model.abort(sequence)
            generation._deliver(None)
        if self.model.in_step:  # cancelled mid-step: end it, so that a restart can begin one
            self.model.end_step()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def submit(
        self,
        prompt_tokens: int,
        output_tokens: int,
        n: int = 1,
        finish_reason: FinishReason = "length",
    ) -> Generation | Refusal:
        """Queue a request of ``n`` choices (``n`` sequences, submitted together or not at
        all).

        Returns:
            Its generation to iterate, or the refusal (400: larger than the KV cache; 503:
            ``max_queued`` reached).
        """
        if refusal := self.model.refusal(prompt_tokens, output_tokens, n):
            return refusal
        sequences = []
        for _ in range(n):
            sequence = self.model.submit(prompt_tokens, output_tokens, finish_reason)
            assert isinstance(sequence, Sequence)  # refusal() said it fits
            sequences.append(sequence)
        generation = Generation(self, tuple(sequences))
        for choice, sequence in enumerate(sequences):
            self._owners[sequence.id] = (generation, choice)
        self._ensure_started()
        assert self._wake is not None
        self._wake.set()
        return generation

    def _abort(self, sequence: Sequence) -> None:
        self._owners.pop(sequence.id, None)
        self.model.abort(sequence)

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))

    async def _run(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due: float | None = None  # when the step in progress ends, on the loop's clock
        while True:
            step = self.model.begin_step()
            if step is None:
                wake.clear()
                await wake.wait()
                due = None
                continue
            now = loop.time()
            if due is None or now - due > _MAX_LAG:
                due = now
            due += step.duration
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._deliver(self.model.end_step())

    def _deliver(self, ended: StepEnd) -> None:
        for sequence in ended.tokens:
            if owner := self._owners.get(sequence.id):  # None: submitted to the model itself
                generation, choice = owner
                generation._deliver((choice, sequence.generated))
        for sequence in ended.finished:
            self._owners.pop(sequence.id, None)


# --- /metrics --------------------------------------------------------------------------------


def render_metrics(model: GpuModel, model_name: str) -> bytes:
    """The engine's state in Prometheus text, named and labelled as vLLM (V1) names them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_VllmCollector(model, model_name))
    return generate_latest(registry)


class _VllmCollector:
    """Metric names, types, help texts and labels are vLLM's (``vllm/v1/metrics/loggers.py``:
    ``model_name`` and ``engine``, always engine 0 here)."""

    labels = ("model_name", "engine")

    def __init__(self, model: GpuModel, model_name: str) -> None:
        self.model = model
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        m = self.model
        values = [self.model_name, "0"]
        gauges = (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                m.running,
            ),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", m.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m.kv_usage),
            (
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage. "
                "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                m.kv_usage,
            ),
        )
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=self.labels)
            gauge.add_metric(values, value)
            yield gauge
        counters = (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens_total),
            (
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                m.generation_tokens_total,
            ),
        )
        for name, documentation, total in counters:
            counter = CounterMetricFamily(name, documentation, labels=self.labels)
            counter.add_metric(values, total)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=(*self.labels, "finished_reason"),
        )
        for reason, count in m.requests_finished.items():
            success.add_metric([*values, reason], count)
        success.add_metric([*values, "abort"], m.requests_aborted_total)
        yield success

"""Concurrency that follows the model server: a replica's limit between ``min_concurrency`` and
``max_concurrency``, raised while the server keeps up and cut when it says it cannot.

Signals, whichever the server offers:

- its Prometheus metrics (``Load.parse``): vLLM's ``vllm:num_requests_waiting`` /
  ``vllm:num_requests_running`` / ``vllm:kv_cache_usage_perc`` (older
  ``vllm:gpu_cache_usage_perc``), llama.cpp's ``llamacpp:requests_deferred`` /
  ``llamacpp:requests_processing``: more waiting than ``target_waiting`` in two readings in a
  row is saturation (one request that arrived mid-step is not a queue); the requests its KV
  cache holds (those running over the share of the cache they fill) cap the limit, so the
  headroom kept for the highest priority is room in the cache, not a place in its queue;
- the server saying it is full (a 429 or 503 answer): cut at once;
- latency against its unloaded baseline (``Gradient``): time to first token, per size of
  prompt, and time per output token; an interval whose average is ``latency_tolerance`` times
  the baseline is saturation: a batch grown past where the server's throughput stops rising
  only makes every request slower. Time to first token (which swings by a decode step with
  when a request arrives) is judged only where no metrics count the server's queue; it is all
  the queue signal a server with no metrics endpoint (Ollama) gives.

The rule is TCP's: slow start (doubling each interval) until the first saturation, then additive
increase (``sqrt(limit)`` per interval, so a big limit recovers in seconds, not minutes) while
the limit is in use and nothing says the server is full, and multiplicative decrease (x0.75)
when something does, while the limit is in use: at light load a request that arrived mid-step
looks like a queue, and a cut would only make the next burst wait in the gateway. A cut is not
repeated while the requests of the last one drain (more in flight than the new limit): what
the server says in that time is the past. A 429 or 503 cuts at once, in use or not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["DECREASE", "Controller", "Gradient", "Load"]

#: The multiplicative decrease.
DECREASE = 0.75
#: A KV cache this full takes nothing more: the limit holds.
KV_FULL = 0.98
#: Samples an interval needs before its latency counts.
MIN_SAMPLES = 3
#: How fast a baseline forgets its best, per interval (so a changed model re-learns it).
BASELINE_DRIFT = 1.01

_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")


class Load(NamedTuple):
    """What a model server's ``/metrics`` said (None: it does not say)."""

    running: float | None
    waiting: float | None
    kv_usage: float | None  # 0..1

    @classmethod
    def parse(cls, text: str) -> Load | None:
        """Read the Prometheus text format; values of one name are summed over its labels (one
        per model). None when no name we know is there."""
        found: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            brace = line.find("{")
            if brace >= 0:
                name, rest = line[:brace], line[line.rfind("}") + 1 :]
            else:
                name, _, rest = line.partition(" ")
            fields = rest.split()
            try:
                value = float(fields[0]) if fields else math.nan
            except ValueError:
                continue
            if math.isfinite(value):
                found[name] = found.get(name, 0.0) + value

        def first(names: tuple[str, ...]) -> float | None:
            return next((found[n] for n in names if n in found), None)

        load = cls(first(_RUNNING), first(_WAITING), first(_KV))
        return None if load == (None, None, None) else load


class Gradient:
    """One latency signal: the interval's average against the best interval seen."""

    __slots__ = ("_count", "_sum", "baseline")

    def __init__(self) -> None:
        self.baseline: float | None = None
        self._sum = 0.0
        self._count = 0

    def add(self, seconds: float) -> None:
        self._sum += seconds
        self._count += 1

    def ratio(self) -> float | None:
        """This interval's average over the baseline (None: too few samples); starts the
        next interval."""
        count, total = self._count, self._sum
        self._sum, self._count = 0.0, 0
        if self.baseline is not None:
            self.baseline *= BASELINE_DRIFT
        if count < MIN_SAMPLES:
            return None
        mean = total / count
        if self.baseline is None or mean < self.baseline:
            self.baseline = mean
        return mean / self.baseline if self.baseline > 0 else None


class Controller:
    """One replica's limit. ``tick`` runs every ``interval_ms``; ``overloaded`` on a 429 or 503;
    ``load`` and ``latency`` feed it. ``in_flight`` reads what the replica carries now."""

    def __init__(
        self,
        *,
        min_concurrency: int,
        max_concurrency: int,
        target_waiting: int = 0,
        headroom: float = 0.1,
        latency_tolerance: float = 2.0,
        in_flight: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = float(min_concurrency)
        self.configure(
            min_concurrency=min_concurrency,
            max_concurrency=max_concurrency,
            target_waiting=target_waiting,
            headroom=headroom,
            latency_tolerance=latency_tolerance,
        )
        self.in_flight = in_flight
        self.clock = clock
        self.slow_start = True
        self.peak = 0  # most in flight since the last tick
        self.last_load: Load | None = None
        self.previous_load: Load | None = None
        self.ttft: dict[int, Gradient] = {}  # by prompt size (a power of two)
        self.tpot = Gradient()
        self.answer = Gradient()  # non-streamed: seconds per output token, prefill and all
        self.decreases = 0
        self.ceiling: float | None = None  # in flight when the server was last saturated
        self.reason = "starting"  # what the last change was for (logs, /health)

    # -- what the gate reads -----------------------------------------------------------------

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def below_top(self) -> int:
        """What the tiers below the highest priority may use: the limit less its headroom."""
        limit = int(self._limit)
        return max(1, limit - max(1, math.ceil(limit * self.headroom))) if self.headroom else limit

    def configure(
        self,
        *,
        min_concurrency: int,
        max_concurrency: int,
        target_waiting: int,
        headroom: float,
        latency_tolerance: float,
    ) -> None:
        """Take the settings (at start, and again on a reload: what it has learnt stays)."""
        self.resize(min_concurrency, max_concurrency)
        self.target_waiting = target_waiting
        self.headroom = headroom
        self.tolerance = latency_tolerance

    def resize(self, min_concurrency: int, max_concurrency: int) -> None:
        """A reload changed the bounds: the limit stays where it is, within them."""
        self.min = min_concurrency
        self.max = max(min_concurrency, max_concurrency)
        self._limit = min(max(self._limit, self.min), self.max)

    # -- signals -------------------------------------------------------------------------------

    def started(self) -> None:
        """A request was sent (for the peak in flight of this interval)."""
        self.peak = max(self.peak, self.in_flight())

    def load(self, load: Load | None) -> None:
        """The interval's reading of the server's metrics (None: none)."""
        self.previous_load, self.last_load = self.last_load, load

    def _waiting(self) -> float | None:
        """Requests waiting on the server in the last two readings, the fewer of the two: a
        request that arrived during a step waits for the next one, and is not a queue."""
        readings = (self.last_load, self.previous_load)
        counts = [self._queued(r) for r in readings if r is not None and r.waiting is not None]
        return min(counts) if len(counts) == 2 else None

    @staticmethod
    def _queued(load: Load) -> float:
        """What of a reading's waiting is a queue. A few requests that the KV cache has room
        for (at the running ones' average size) are between steps: the next one takes them.
        At many requests a second some are always between steps, so two readings in a row
        do not tell them from a queue; a real queue outgrows a tenth of the batch."""
        waiting, running, kv = load.waiting or 0.0, load.running, load.kv_usage
        if not waiting or not running or kv is None or kv <= 0:
            return waiting
        room = (1.0 - kv) / (kv / running)  # requests of the average size that still fit
        return 0.0 if waiting <= min(room, max(1.0, running / 10)) else waiting

    def latency(
        self,
        prompt_tokens: int,
        *,
        ttft: float | None = None,
        tpot: float | None = None,
        answer_per_token: float | None = None,
    ) -> None:
        """One stream's time to first token (for its prompt's size) and time per output token
        after it; or a non-streamed answer's time per output token, all in."""
        if answer_per_token is not None:
            self.answer.add(answer_per_token)
        if ttft is not None:
            size = max(0, prompt_tokens).bit_length()
            gradient = self.ttft.get(size)
            if gradient is None:
                gradient = self.ttft[size] = Gradient()
            gradient.add(ttft)
        if tpot is not None:
            self.tpot.add(tpot)

    def overloaded(self) -> bool:
        """The server answered 429 or 503: cut now (unless a cut is still draining). Returns
        whether the limit changed."""
        return self._decrease("the server answered it was full")

    # -- the rule -------------------------------------------------------------------------------

    def tick(self) -> str | None:
        """One interval's decision: ``"decrease"``, ``"increase"`` or None (held)."""
        saturated = self._saturated()
        peak, self.peak = max(self.peak, self.in_flight()), 0
        # lower tiers stop at below_top: that is them using all they may
        in_use = peak >= self.below_top
        if saturated is not None and in_use:  # else the limit is not what feeds the server
            why, share = saturated
            return "decrease" if self._decrease(why, share) else None
        capacity = self._capacity()
        if capacity is not None and self._limit > capacity:
            self.slow_start = False
            self.ceiling = capacity
            self._limit = float(capacity)
            self.reason = f"its KV cache holds about {capacity}"
            return "decrease"
        load = self.last_load
        if load is not None and load.kv_usage is not None and load.kv_usage >= KV_FULL:
            self.reason = "KV cache full"
            return None
        ceiling = self.max if capacity is None else min(self.max, capacity)
        if not in_use or self._limit >= ceiling:
            return None  # the limit is not what holds requests back, or all the server holds
        if self.slow_start:
            self._limit = min(ceiling, self._limit * 2)
        else:
            near = self.ceiling is not None and 0.9 <= self._limit / self.ceiling <= 1.1
            step = 1.0 if near else max(1.0, math.sqrt(self._limit))  # probe where it broke
            self._limit = min(ceiling, self._limit + step)
        self.reason = "keeping up"
        return "increase"

    def _capacity(self) -> int | None:
        """Requests the server holds at once, from its last reading: those it runs over the
        share of its KV cache they fill, plus ``target_waiting``. The limit stays within it, so
        the headroom is room in the cache for the highest priority, not a place in the server's
        queue behind the others. None when the server does not say (or its cache is less than
        half full: too little to tell from)."""
        load = self.last_load
        if load is None or not load.running or load.kv_usage is None or load.kv_usage < 0.5:
            return None
        return max(self.min, math.floor(load.running / load.kv_usage) + self.target_waiting)

    def _saturated(self) -> tuple[str, float | None] | None:
        """Why the server is saturated now, and the share of what is in flight it can take
        (from its metrics: running + target_waiting over running + waiting; else None),
        or None."""
        load = self.last_load
        waiting = self._waiting()
        found: tuple[str, float | None] | None = None
        if load is not None and waiting is not None and waiting > self.target_waiting:
            running = load.running or 0.0
            share = (running + self.target_waiting) / (running + waiting)
            found = f"{waiting:g} waiting on the server", share
        ratios = [(g.ratio(), "time to first token") for g in self.ttft.values()]
        if load is not None and load.waiting is not None:
            ratios = []  # its queue is counted: a first token's wait is told better by that
        ratios.append((self.tpot.ratio(), "time per output token"))
        ratios.append((self.answer.ratio(), "answer time per token"))
        for ratio, name in ratios:
            if found is None and ratio is not None and ratio > self.tolerance:
                found = f"{name} {ratio:.1f}x its unloaded baseline", None
        return found

    def _decrease(self, reason: str, share: float | None = None) -> bool:
        """Cut to ``share`` of what is in flight (or of the limit, if less is in flight): what
        the server's metrics say it takes, else ``DECREASE``."""
        in_flight = self.in_flight()
        if in_flight > self.limit:
            return False  # the last cut is still draining
        self.slow_start = False
        base = min(self._limit, float(in_flight)) or self._limit
        # Where it broke: what the server said it can take, else what it was given.
        self.ceiling = base if share is None else base * share
        cut = base * (DECREASE if share is None else share)
        cut = max(float(self.min), min(math.floor(cut), base - 1))
        if cut >= self._limit:
            return False
        self._limit = cut
        self.decreases += 1
        self.reason = reason
        return True

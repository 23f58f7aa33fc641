"""Decisions per second: quotagate against ``limits`` 5.x, in memory and on Redis, side by side.

A decision is one request checked against two limits, "60/minute" and "1000/day". quotagate makes
ONE call, ``await limiter.hit(key, "60/minute; 1000/day")``; ``limits`` (async API, moving window
and fixed window) makes one ``hit()`` per limit, in order, stopping at the first rejection, as
slowapi does. Scenarios: the allowed path (a pool of n/10 keys, each hit 10 times, so nothing is
rejected) and the rejected path (one key pushed over its limit first), each run by one task
awaiting in a loop and by 50 tasks sharing the count. quotagate runs with its over-limit cache on
and off (off: every decision pays the storage). Redis rows also give Redis commands per
decision from ``INFO commandstats`` (commands run inside Lua scripts included).

The script starts its own redis-server on a free loopback port (pinned to core 1) unless given
``--redis-url``, and pins itself to core 0 unless ``--no-pin``. Each measurement is a fixed number
of decisions; variants are interleaved per round and the median over rounds is reported.

Run:  .venv/bin/python benchmarks/decisions.py [--rounds 3] [--json] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Literal

import limits
import redis
from limits.aio.storage import MemoryStorage as LimitsMemoryStorage
from limits.aio.storage import RedisStorage as LimitsRedisStorage
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

import quotagate as qg
from quotagate.testing import ServerProcess

RATES = "60/minute; 1000/day"
LIMIT_ITEMS = limits.parse_many(RATES)
CONCURRENCY = 50
HITS_PER_KEY = 10  # allowed path: each key of the pool is hit this often per measurement
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_fcall")

Backend = Literal["memory", "redis"]
Path = Literal["allowed", "rejected"]
Decide = Callable[[str], Awaitable[bool]]
Strategy = MovingWindowRateLimiter | FixedWindowRateLimiter


async def _nothing() -> None:
    return None


@dataclass
class Session:
    """What one measurement uses: the decision function and how to drop its state after."""

    decide: Decide
    close: Callable[[], Awaitable[None]] = _nothing


@dataclass
class Variant:
    id: str
    backend: Backend
    library: Literal["quotagate", "limits"]
    label: str
    open: Callable[[], Awaitable[Session]]


@dataclass(frozen=True)
class Scenario:
    backend: Backend
    path: Path
    concurrency: int

    @property
    def label(self) -> str:
        tasks = "sequential" if self.concurrency == 1 else f"{self.concurrency} tasks"
        return f"{self.backend}, {self.path} path, {tasks}"


@dataclass
class Sample:
    rate: float
    allowed: int
    rejected: int
    errors: int
    first_error: str | None
    commands: dict[str, float] | None  # Redis commands per decision, by command


@dataclass
class Result:
    scenario: Scenario
    variant: Variant
    samples: list[Sample] = field(default_factory=list)


# --- decisions -------------------------------------------------------------------------------


def quotagate_decide(limiter: qg.RateLimiter) -> Decide:
    async def decide(key: str) -> bool:
        return (await limiter.hit(key, RATES)).allowed

    return decide


def limits_decide(strategy: Strategy) -> Decide:
    async def decide(key: str) -> bool:
        for item in LIMIT_ITEMS:  # one hit() per limit, stop at the first rejection
            if not await strategy.hit(item, key):
                return False
        return True

    return decide


# --- variants --------------------------------------------------------------------------------


def quotagate_memory(cache: bool) -> Variant:
    async def open_() -> Session:  # fresh state for every measurement
        limiter = qg.RateLimiter(qg.MemoryStorage(), overlimit_cache=cache)
        await limiter.start()
        return Session(quotagate_decide(limiter), limiter.aclose)

    return Variant(f"qg-mem-{_on(cache)}", "memory", "quotagate", _qg_label(cache), open_)


def limits_memory(strategy: type[Strategy]) -> Variant:
    async def open_() -> Session:  # fresh state for every measurement
        storage = LimitsMemoryStorage()

        async def close() -> None:
            # Its expiry task only runs when the loop idles; keep it out of later measurements.
            timer = storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
                await asyncio.wait([timer])  # unlike `await timer`, keeps a Ctrl-C of ours

        return Session(limits_decide(strategy(storage)), close)

    kind = _window(strategy)
    return Variant(f"lim-mem-{kind}", "memory", "limits", f"limits {kind} window", open_)


async def quotagate_redis(
    url: str, prefix: str, cache: bool, stack: contextlib.AsyncExitStack
) -> Variant:
    storage = qg.RedisStorage(url, prefix=prefix, timeout=2.0)
    limiter = qg.RateLimiter(storage, overlimit_cache=cache)
    await limiter.start()
    stack.push_async_callback(limiter.aclose)
    session = Session(quotagate_decide(limiter))

    async def open_() -> Session:
        return session

    return Variant(f"qg-redis-{_on(cache)}", "redis", "quotagate", _qg_label(cache), open_)


async def limits_redis(
    url: str,
    prefix: str,
    strategy: type[Strategy],
    driver: Literal["coredis", "redispy"],
    stack: contextlib.AsyncExitStack,
) -> Variant:
    storage = LimitsRedisStorage("async+" + url, implementation=driver, key_prefix=prefix)
    if not await storage.check():
        raise RuntimeError(f"limits cannot reach Redis at {url} with {driver}")
    stack.push_async_callback(_close_limits_redis, storage)
    session = Session(limits_decide(strategy(storage)))

    async def open_() -> Session:
        return session

    kind = _window(strategy)
    label = f"limits {kind} window ({driver})"
    return Variant(f"lim-redis-{kind}-{driver}", "redis", "limits", label, open_)


async def _close_limits_redis(storage: LimitsStorage) -> None:
    client: Any = getattr(getattr(storage, "bridge", None), "storage", None)
    if hasattr(client, "aclose"):  # redis-py
        await client.aclose()
    elif hasattr(client, "connection_pool"):  # coredis
        client.connection_pool.disconnect()


def _on(cache: bool) -> str:
    return "cache-on" if cache else "cache-off"


def _qg_label(cache: bool) -> str:
    return f"quotagate (over-limit cache {'on' if cache else 'off'})"


def _window(strategy: type[Strategy]) -> str:
    return "moving" if strategy is MovingWindowRateLimiter else "fixed"


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    allowed: int = 0
    rejected: int = 0
    errors: int = 0
    first_error: str | None = None


async def timed(decide: Decide, keys: Sequence[str], n: int, concurrency: int) -> Run:
    """Make ``n`` decisions over ``keys`` (round robin) with ``concurrency`` tasks; time them."""
    run = Run(0.0)
    taken = 0
    pool = len(keys)

    async def worker() -> None:
        nonlocal taken
        while taken < n:
            i = taken
            taken += 1
            try:
                allowed = await decide(keys[i % pool])
            except Exception:
                run.errors += 1
                if run.first_error is None:
                    run.first_error = traceback.format_exc()
                continue
            if allowed:
                run.allowed += 1
            else:
                run.rejected += 1

    started = time.perf_counter()
    if concurrency == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


async def push_over(decide: Decide, key: str) -> None:
    """Hit ``key`` until it is rejected."""
    for _ in range(10_000):
        if not await decide(key):
            return
    raise RuntimeError(f"{key!r} was never rejected")


class RedisStats:
    """Calls per Redis command, from ``INFO commandstats`` (our own INFO calls left out)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def counts(self) -> Counter[str]:
        stats: dict[str, dict[str, int]] = self.client.info("commandstats")
        return Counter({k: v["calls"] for k, v in stats.items() if k != "cmdstat_info"})

    def server_version(self) -> str:
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", "unknown"))

    def delete(self, pattern: str) -> int:
        keys = list(self.client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            self.client.unlink(*keys[start : start + 1000])
        return len(keys)


async def measure(
    variant: Variant, scenario: Scenario, n: int, tag: str, stats: RedisStats | None
) -> Sample:
    session = await variant.open()
    try:
        if scenario.path == "allowed":
            keys = [f"{tag}:{j}" for j in range(max(1, n // HITS_PER_KEY))]
        else:
            keys = [f"{tag}:over"]
            await push_over(session.decide, keys[0])
        gc.collect()
        before = stats.counts() if stats is not None else None
        run = await timed(session.decide, keys, n, scenario.concurrency)
        commands = None
        if stats is not None and before is not None:
            delta = stats.counts() - before
            commands = {k.removeprefix("cmdstat_"): v / n for k, v in sorted(delta.items())}
    finally:
        await session.close()
    return Sample(n / run.seconds, run.allowed, run.rejected, run.errors, run.first_error, commands)


# --- the run ---------------------------------------------------------------------------------


def scenarios() -> list[Scenario]:
    return [
        Scenario(backend, path, concurrency)
        for backend in ("memory", "redis")
        for path in ("allowed", "rejected")
        for concurrency in (1, CONCURRENCY)
    ]


async def bench(args: argparse.Namespace, url: str, run_id: str) -> list[Result]:
    stats = RedisStats(url)
    prefix = f"qgbench-{run_id}"
    async with contextlib.AsyncExitStack() as stack:
        variants = [
            quotagate_memory(cache=True),
            quotagate_memory(cache=False),
            limits_memory(MovingWindowRateLimiter),
            limits_memory(FixedWindowRateLimiter),
            await quotagate_redis(url, prefix, True, stack),
            await quotagate_redis(url, prefix, False, stack),
        ]
        for driver in ("coredis", "redispy"):
            for strategy in (MovingWindowRateLimiter, FixedWindowRateLimiter):
                variants.append(
                    await limits_redis(url, f"{prefix}-limits", strategy, driver, stack)
                )
        results = [
            Result(scenario, variant)
            for scenario in scenarios()
            for variant in variants
            if variant.backend == scenario.backend
        ]

        def size(result: Result) -> int:
            return args.n_memory if result.scenario.backend == "memory" else args.n_redis

        started = time.perf_counter()
        for result in results:  # warm-up: connections, scripts, caches; not reported
            await one(result, max(200, size(result) // 20), f"{run_id}:warm", stats, keep=False)
        _progress(f"warm-up done in {time.perf_counter() - started:.0f}s")
        for round_ in range(args.rounds):
            for scenario in scenarios():
                group = [r for r in results if r.scenario == scenario]
                shift = round_ % len(group)  # rotate the order so no variant always goes first
                for result in group[shift:] + group[:shift]:
                    await one(result, size(result), f"{run_id}:r{round_}", stats, keep=True)
            _progress(
                f"round {round_ + 1}/{args.rounds} done at {time.perf_counter() - started:.0f}s"
            )
    if args.redis_url:
        stats.delete(f"{prefix}*")
    return results


async def one(result: Result, n: int, tag: str, stats: RedisStats, *, keep: bool) -> None:
    scenario, variant = result.scenario, result.variant
    full_tag = f"{tag}:{variant.id}:{scenario.path}:c{scenario.concurrency}"
    redis_stats = stats if scenario.backend == "redis" else None
    sample = await measure(variant, scenario, n, full_tag, redis_stats)
    if sample.first_error is not None:
        print(
            f"\n!! {sample.errors} error(s) in {variant.label} / {scenario.label}"
            f"{'' if keep else ' (warm-up)'}; first one:\n{sample.first_error}",
            file=sys.stderr,
            flush=True,
        )
    if keep:
        result.samples.append(sample)


def _progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# --- report ----------------------------------------------------------------------------------


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for result in results:
        samples = result.samples
        rates = [s.rate for s in samples]
        decided = sum(s.allowed + s.rejected for s in samples)
        commands: dict[str, float] | None = None
        if samples and samples[0].commands is not None:
            names = sorted({name for s in samples for name in s.commands or {}})
            commands = {
                name: statistics.median((s.commands or {}).get(name, 0.0) for s in samples)
                for name in names
            }
        rows.append(
            {
                "backend": result.scenario.backend,
                "path": result.scenario.path,
                "concurrency": result.scenario.concurrency,
                "scenario": result.scenario.label,
                "variant": result.variant.id,
                "label": result.variant.label,
                "library": result.variant.library,
                "decisions_per_s": statistics.median(rates) if rates else None,
                "rounds_per_s": rates,
                "allowed_fraction": (sum(s.allowed for s in samples) / decided)
                if decided
                else None,
                "errors": sum(s.errors for s in samples),
                "redis_commands_per_decision": (
                    statistics.median(sum((s.commands or {}).values()) for s in samples)
                    if commands is not None
                    else None
                ),
                "redis_scripts_per_decision": (
                    sum(commands.get(k.removeprefix("cmdstat_"), 0.0) for k in SCRIPT_COMMANDS)
                    if commands is not None
                    else None
                ),
                "redis_commands_by_name": commands,
            }
        )
    for row in rows:
        best = max(
            (
                r["decisions_per_s"]
                for r in rows
                if r["scenario"] == row["scenario"] and r["library"] == "limits"
            ),
            default=None,
        )
        row["vs_limits_best"] = row["decisions_per_s"] / best if best else None
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'variant':<34}{'decisions/s':>12}{'spread':>8}{'vs limits':>11}"
        f"{'allowed':>9}{'cmds/dec':>10}{'scripts/dec':>12}{'errors':>8}"
    )
    scenario = None
    for row in rows:
        if row["scenario"] != scenario:
            scenario = row["scenario"]
            print(f"\n{scenario}\n{head}\n{'-' * len(head)}")
        rates = row["rounds_per_s"]
        spread = (max(rates) - min(rates)) / row["decisions_per_s"] if rates else 0.0
        ratio = row["vs_limits_best"]
        if row["library"] == "limits":
            ratio_text = "(best)" if ratio == 1.0 else f"({ratio:.2f}x)"
        else:
            ratio_text = f"{ratio:.2f}x"
        allowed = row["allowed_fraction"]
        print(
            f"{row['label']:<34}{row['decisions_per_s']:>12,.0f}{spread:>8.1%}{ratio_text:>11}"
            f"{'-' if allowed is None else f'{allowed:.2%}':>9}"
            f"{_maybe(row['redis_commands_per_decision']):>10}"
            f"{_maybe(row['redis_scripts_per_decision']):>12}{row['errors']:>8}"
        )


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- process setup ---------------------------------------------------------------------------


def start_redis() -> ServerProcess:
    """Start redis-server on a free loopback port, its log in a directory of its own."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="qgbench-redis-"))
    command = [binary, "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(workdir)]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "1", *command]
    server = ServerProcess(
        command, name="redis-server", log=workdir / "redis.log", startup_timeout=10, port_retries=2
    )
    server.start()
    return server


def quotagate_source() -> str:
    """Which quotagate was measured: git commit (+dirty) and a digest of the imported source."""
    package = pathlib.Path(qg.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".lua"):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    git = ["git", "-C", str(package)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    commit = head.stdout.strip() or "no git"
    if dirty.stdout.strip():
        commit += "+dirty"
    return f"{commit}, source sha256 {digest.hexdigest()[:12]}"


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when installed (``auto``) or asked for, else the asyncio default loop."""
    if choice == "asyncio":
        return None, "asyncio (asked for)"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None, "asyncio (uvloop not installed)"
    return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n-memory", type=int, default=200_000, help="decisions per memory run")
    parser.add_argument("--n-redis", type=int, default=20_000, help="decisions per Redis run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--redis-url", help="use this Redis instead of starting redis-server")
    parser.add_argument("--no-pin", action="store_true", help="do not pin this process to core 0")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    if not args.no_pin:
        os.sched_setaffinity(0, {0})
    loop_factory, loop_name = event_loop(args.loop)
    server: ServerProcess | None = None
    try:
        if args.redis_url:
            url, where = args.redis_url, f"{args.redis_url} (given)"
        else:
            server = start_redis()
            url = f"redis://127.0.0.1:{server.port}/0"
            where = f"{url}, pid {server.pid}, taskset -c 1, log {server.log}"
        meta: dict[str, Any] = {
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "quotagate": qg.__version__,
            "quotagate_source": quotagate_source(),
            "limits": version("limits"),
            "coredis": version("coredis"),
            "redis_py": version("redis"),
            "redis_server": RedisStats(url).server_version(),
            "loop": loop_name,
            "pinned_to": None if args.no_pin else sorted(os.sched_getaffinity(0)),
            "cpus": os.cpu_count(),
            "rates": RATES,
            "n_memory": args.n_memory,
            "n_redis": args.n_redis,
            "rounds": args.rounds,
            "concurrency": CONCURRENCY,
        }
        for name, value in meta.items():
            print(f"{name:>16}: {value}")
        print(f"{'redis':>16}: {where}", flush=True)
        run_id = os.urandom(3).hex()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(bench(args, url, run_id))
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.log.parent, ignore_errors=True)
    rows = summarize(results)
    print_table(rows)
    meta["seconds"] = round(time.perf_counter() - wall, 1)
    print(f"\ntotal {meta['seconds']}s; one decision = one request against {RATES!r}")
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

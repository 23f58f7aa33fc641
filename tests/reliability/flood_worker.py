"""Key flood in a fresh process, so that its memory figures are its own: the gateway app on
memory storage, driven in process through its ASGI interface (the full app, minus the socket),
by a flood of distinct clients. Prints one JSON object of figures.

    python tests/reliability/flood_worker.py --keys 200000 --ips 200000 --unknown 200000
    python tests/reliability/flood_worker.py --ips 100000 --frozen --max-keys 50000

It imports the installed quotagate; the test that spawns it puts the one under test first on
PYTHONPATH.

Time is a fake clock: ``--rate`` new clients per simulated second (each request advances it),
or ``--frozen`` (every client inside one refill window: nothing is reclaimable, the worst case).
The client addresses are strings in the ASGI scope (loopback addresses); nothing is sent
anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import quotagate as qg
from quotagate.gateway.app import create_app
from quotagate.gateway.backends.mock import MockBackend
from quotagate.gateway.config import DEFAULT_CONFIG, GatewayConfig
from quotagate.identity import hash_api_key

BODY = json.dumps({"prompt": "x", "max_tokens": 4}).encode()


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def loopback(i: int) -> str:
    """The i-th distinct address in 127.0.0.0/8 (past 127.0.0.1)."""
    i += 2
    return f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def flood_key(i: int) -> str:
    return f"sk-flood-{i:08d}"


def config(keys: int) -> GatewayConfig:
    import tomllib

    data: dict[str, Any] = tomllib.loads(DEFAULT_CONFIG)
    data["keys"] = [{"sha256": hash_api_key(flood_key(i)), "tier": "free"} for i in range(keys)]
    return GatewayConfig.model_validate(data)


class Driver:
    """Calls the ASGI app the way uvicorn does, one request at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers = [
            (b"host", b"gateway"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ]

    async def post(self, client: str, api_key: str | None) -> int:
        headers = (
            self.headers if api_key is None else [*self.headers, (b"x-api-key", api_key.encode())]
        )
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": (client, 40000),
            "server": ("127.0.0.1", 8000),
        }
        delivered = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.Future()  # the client stays connected
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status


async def main(args: argparse.Namespace) -> dict[str, Any]:
    clock = qg.FakeClock()
    storage = qg.MemoryStorage(clock=clock, max_keys=args.max_keys)
    rss_start = kib("VmRSS")
    app = create_app(config(args.keys), storage=storage, backend=MockBackend())
    tick = 0.0 if args.frozen else 1.0 / args.rate
    out: dict[str, Any] = {"rate_per_simulated_s": None if args.frozen else args.rate}
    states_peak = 0
    async with app.router.lifespan_context(app):
        driver = Driver(app)
        for i in range(100):  # warm every code path before the baseline
            await driver.post("127.0.0.1", None if i % 2 else flood_key(0))
        clock.advance(86400 * 2)
        storage.sweep()
        gc.collect()
        rss_before = kib("VmRSS")
        out["rss_baseline_mib"] = round(rss_before / 1024, 1)
        out["rss_of_app_and_key_config_mib"] = round((rss_before - rss_start) / 1024, 1)

        async def phase(name: str, count: int, who: Any, expect: int) -> None:
            nonlocal states_peak
            started = time.perf_counter()
            statuses: dict[int, int] = {}
            for i in range(count):
                client, key = who(i)
                status = await driver.post(client, key)
                statuses[status] = statuses.get(status, 0) + 1
                clock.advance(tick)
                if i % 1000 == 0:
                    states_peak = max(states_peak, len(storage))
            states_peak = max(states_peak, len(storage))
            seconds = time.perf_counter() - started
            out[name] = {
                "requests": count,
                "statuses": statuses,
                "seconds": round(seconds, 1),
                "requests_per_s": round(count / seconds),
                "states_after": len(storage),
                "rss_growth_mib": round((kib("VmRSS") - rss_before) / 1024, 1),
            }
            assert statuses.get(expect) == count, (name, statuses)

        if args.keys:
            await phase("valid_keys", args.keys, lambda i: ("127.0.0.1", flood_key(i)), 200)
            key_states = set(storage._states)  # (keyed by hashes of the state keys)
        if args.ips:
            await phase("ips", args.ips, lambda i: (loopback(i), None), 200)
        if args.unknown:
            before = len(storage)
            await phase("unknown_keys", args.unknown, lambda i: ("127.0.0.1", f"sk-x-{i}"), 401)
            out["unknown_keys"]["states_added"] = len(storage) - before
        if args.keys and args.ips:
            # Quiet since the first phase: their state must be gone, swept as new clients came.
            out["key_states_after_keys"] = len(key_states)
            out["key_states_left_after_ips"] = len(key_states & set(storage._states))
        gc.collect()
        out["states_peak"] = states_peak
        out["states_end"] = len(storage)
        out["max_keys"] = args.max_keys
        out["rss_growth_mib"] = round((kib("VmRSS") - rss_before) / 1024, 1)
        out["peak_rss_growth_mib"] = round((kib("VmHWM") - rss_before) / 1024, 1)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=0, help="distinct valid API keys")
    parser.add_argument("--ips", type=int, default=0, help="distinct anonymous client IPs")
    parser.add_argument("--unknown", type=int, default=0, help="distinct unknown API keys")
    parser.add_argument("--rate", type=float, default=2000.0, help="clients per simulated s")
    parser.add_argument("--frozen", action="store_true", help="the clock never moves")
    parser.add_argument("--max-keys", type=int, default=1_000_000)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))

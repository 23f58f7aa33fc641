"""What ``reserve = "estimate"`` buys a budget: requests admitted before a budget is spent, with
answers of about 200 tokens and ``max_tokens = 4096``, against ``reserve = "max_tokens"``; and
that neither overshoots the budget.

In process (the gateway app on the memory storage, the mock model answering 200 tokens at
2,000 tokens a second, so 16 clients' requests overlap as they would on a server): a key with
a daily budget worth 50, 200 or 1,000 answers sends from 16 concurrent workers, each request
asking for ``max_tokens = 4096``, until the budget refuses it with nothing in flight (a refusal
while others hold reservations is counted, and tried again when they end), streamed and not.
The figures are counts, not timings, so one run on any machine says it.

Run: .venv/bin/python benchmarks/budget_reserve.py [--answers 50,200,1000] [--workers 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder's http.py (a benchmark) shadows the standard library's package httpx needs.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

import quotagate as qg  # noqa: E402
from quotagate.gateway.app import create_app  # noqa: E402
from quotagate.gateway.backends.mock import MockBackend  # noqa: E402
from quotagate.gateway.config import load_config  # noqa: E402

CONFIG = """
[backend]
max_concurrency = 64

[prices."quotagate-mock"]
input = 0
output = 1                   # a micro-dollar a generated token: the arithmetic stays visible

[tiers.metered]
requests = "1000000/minute"
tokens = "1000000000/minute"
default_max_tokens = 4096
budget = "${budget}/day"
reserve = "{reserve}"

[[keys]]
key = "sk-bench-0001"
tier = "metered"
"""
ANSWER = 200
MAX_TOKENS = 4096
KEY = {"X-API-Key": "sk-bench-0001"}


async def spend(reserve: str, answers: int, workers: int, stream: bool) -> dict[str, Any]:
    """Requests admitted until the budget refuses, and what was spent of it."""
    budget_micros = answers * ANSWER
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "gateway.toml"
        path.write_text(CONFIG.format(budget=budget_micros / 1_000_000, reserve=reserve))
        app = create_app(
            load_config(path, environ={}),
            storage=qg.MemoryStorage(),
            backend=MockBackend(tokens_per_second=2000, output_tokens=ANSWER),
        )
        admitted = cut = refused = in_flight = 0
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

                async def worker() -> None:
                    nonlocal admitted, cut, refused, in_flight
                    body = {
                        "model": "quotagate-mock",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": MAX_TOKENS,
                    }
                    if stream:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                    while True:
                        in_flight += 1
                        answer = await client.post("/v1/chat/completions", json=body, headers=KEY)
                        in_flight -= 1
                        if answer.status_code == 200:
                            admitted += 1
                            cut += completion_tokens(answer, stream) < ANSWER
                            continue
                        if not in_flight:  # refused with nothing held: the budget is spent
                            return
                        refused += 1  # refused for what others hold: try again when they end
                        await asyncio.sleep(0.02)

                await asyncio.gather(*(worker() for _ in range(workers)))
                shown = (await client.get("/v1/ratelimit", headers=KEY)).json()["budgets"][0]
    left = round(float(shown["remaining_usd"]) * 1_000_000)
    return {
        "reserve": reserve,
        "stream": stream,
        "admitted": admitted,
        "cut": cut,
        "refused": refused,
        "budget_micro_usd": budget_micros,
        "spent_micro_usd": budget_micros - left,
    }


def completion_tokens(answer: httpx.Response, stream: bool) -> int:
    if not stream:
        return int(answer.json()["usage"]["completion_tokens"])
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    return int(json.loads(events[-2])["usage"]["completion_tokens"])  # the usage, [DONE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--answers", default="50,200,1000", help="budgets to try, in answers (comma-separated)"
    )
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    overshoot = False
    print(f"answers of {ANSWER} tokens, max_tokens {MAX_TOKENS}, {args.workers} concurrent workers")
    print(
        f"{'budget':>8} {'answers':<10} {'reserve':<11} {'admitted':>8} "
        f"{'refused while held':>19} {'cut':>4} {'spent / budget (micro-USD)':>27}"
    )
    for answers in (int(a) for a in args.answers.split(",")):
        for stream in (True, False):
            kind = "streamed" if stream else "completed"
            rows = [
                asyncio.run(spend(r, answers, args.workers, stream))
                for r in ("max_tokens", "estimate")
            ]
            for row in rows:
                spent = f"{row['spent_micro_usd']:,} / {row['budget_micro_usd']:,}"
                print(
                    f"{answers:>8} {kind:<10} {row['reserve']:<11} {row['admitted']:>8} "
                    f"{row['refused']:>19} {row['cut']:>4} {spent:>27}"
                )
                overshoot |= row["spent_micro_usd"] > row["budget_micro_usd"]
            ratio = rows[1]["admitted"] / max(1, rows[0]["admitted"])
            print(f"{'':>8} {kind:<10} estimate admits {ratio:.2f}x the requests of max_tokens")
    print("overshoot: " + ("YES" if overshoot else "none (spent <= budget in every run)"))
    return 1 if overshoot else 0


if __name__ == "__main__":
    sys.exit(main())

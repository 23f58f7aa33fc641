"""Helpers of the operator-tool tests: the CLI in process, and a gateway config."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from quotagate.cli import main

TOOLS = Path(__file__).resolve().parent

#: Small limits so a whole verification takes a handful of requests; three keys per tier so
#: tests that need unused keys on a shared gateway have them.
CONFIG = """
[storage]
url = "{storage}"
prefix = "{prefix}"
{storage_extra}

[anonymous]
tier = "anonymous"

[tiers.anonymous]
requests = "10/minute"
tokens = "2000/minute"
concurrency = 1

[tiers.free]
requests = "5/minute"
tokens = "40000/minute"

[tiers.pro]
requests = "100000/minute"
tokens = "100000000/minute"

[health]
requests = "600/minute"

[[keys]]
key = "sk-free-alice-0001"
tier = "free"

[[keys]]
key = "sk-free-bob-0002"
tier = "free"

[[keys]]
key = "sk-free-carol-0003"
tier = "free"

[[keys]]
key = "sk-free-dave-0004"
tier = "free"

[[keys]]
key = "sk-pro-erin-0005"
tier = "pro"
"""


def cli(*args: str) -> Result:
    """``quotagate ARGS`` in process (the gateways it starts are real processes)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_config(
    directory: Path, storage: str = "memory://", prefix: str = "qg", storage_extra: str = ""
) -> Path:
    """CONFIG on ``storage`` with ``prefix``; ``storage_extra`` is more of the [storage] table."""
    path = directory / "gateway.toml"
    text = CONFIG.format(storage=storage, prefix=prefix, storage_extra=storage_extra)
    path.write_text(text, "utf-8")
    return path

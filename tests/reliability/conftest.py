"""Fixtures of the reliability suite, and the figures each test measured.

A test records its measurements with ``figures["name"] = value``; they are printed under
"reliability figures" at the end of the run (RELIABILITY.md quotes them), and appended as JSON
lines to the file named by ``QUOTAGATE_RELIABILITY_FIGURES`` when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from support import QuotagateProcess

_FIGURES = pytest.StashKey[list[tuple[str, dict[str, Any]]]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Measurements of this test, reported at the end of the run."""
    measured: dict[str, Any] = {}
    yield measured
    if measured:
        request.config.stash.setdefault(_FIGURES, []).append((request.node.nodeid, measured))
        path = os.environ.get("QUOTAGATE_RELIABILITY_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"test": request.node.nodeid, **measured}) + "\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    measured = config.stash.get(_FIGURES, [])
    if not measured:
        return
    terminalreporter.section("reliability figures")
    for nodeid, values in measured:
        terminalreporter.write_line(nodeid)
        for name, value in values.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            terminalreporter.write_line(f"    {name}: {shown}")


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[QuotagateProcess]:
    """``quotagate mock``: the mock model served standalone (a real OpenAI-compatible upstream)."""
    with QuotagateProcess("mock", "--port", "{port}") as process:
        yield process

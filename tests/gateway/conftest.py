from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import QuotagateProcess


@pytest.fixture(scope="session")
def upstream() -> Iterator[QuotagateProcess]:
    """The mock model served standalone by a second process: a real OpenAI-compatible upstream."""
    with QuotagateProcess("mock", "--port", "{port}") as process:
        yield process


@pytest.fixture(scope="session")
def slow_upstream() -> Iterator[QuotagateProcess]:
    """The same, generating 5 tokens a second (a whole answer takes about 5 s)."""
    with QuotagateProcess("mock", "--port", "{port}", "--tokens-per-second", "5") as process:
        yield process

"""The mock model's name is declared once, in ``gateway/backends/__init__.py``, and read
elsewhere."""

from __future__ import annotations

import click
import pytest

from quotagate.gateway.backends import MOCK_MODEL
from quotagate.gateway.schemas import REQUEST_SCHEMAS
from quotagate.tools.bench import bench_command


def test_bench_defaults_to_the_mock_backends_model() -> None:
    option = next(param for param in bench_command.params if param.name == "model")
    assert option.get_default(click.Context(bench_command)) == MOCK_MODEL


@pytest.mark.parametrize("route", sorted(REQUEST_SCHEMAS))
def test_the_openapi_example_model_is_the_mock(route: str) -> None:
    body = REQUEST_SCHEMAS[route]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["model"]["examples"] == [MOCK_MODEL]

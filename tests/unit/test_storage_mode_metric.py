"""The storage-mode gauge has one series per mode the storages declare, exactly one of them 1."""

from __future__ import annotations

import pytest

from quotagate.metrics import PrometheusMetrics
from quotagate.storage import STORAGE_MODES, StorageMode


@pytest.mark.parametrize("mode", STORAGE_MODES)
def test_the_storage_mode_gauge_marks_the_current_mode(mode: StorageMode) -> None:
    metrics = PrometheusMetrics()
    metrics.storage_mode(mode)
    values = {
        name: metrics.registry.get_sample_value("quotagate_storage_mode", {"mode": name})
        for name in STORAGE_MODES
    }
    assert values == {name: 1.0 if name == mode else 0.0 for name in STORAGE_MODES}


def test_the_modes_are_the_storages_own() -> None:
    assert set(STORAGE_MODES) == {"memory", "redis", "fallback"}

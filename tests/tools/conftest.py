from __future__ import annotations

from collections.abc import Iterator

import pytest
from tools_support import write_config

from quotagate.tools._gateway import GatewayProcess


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``quotagate serve`` with CONFIG on memory storage, a real process on a free port."""
    path = write_config(tmp_path_factory.mktemp("gateway"))
    process = GatewayProcess(str(path))
    process.start()
    try:
        yield process
    finally:
        process.close()

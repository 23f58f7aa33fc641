"""A ``quotagate serve`` child process on a free loopback port, started, restarted and stopped by
its process id (never by name: other gateways on the machine are none of our business).

It is ``quotagate.testing.QuotagateProcess`` with the gateway's readiness (``/health`` answers)
and the tools' one-line errors."""

from __future__ import annotations

from ..testing import QuotagateProcess, ServerStartError, http_status
from ._common import ToolError

__all__ = ["GatewayProcess"]


class GatewayProcess(QuotagateProcess):
    """``python -m quotagate serve --config FILE`` on 127.0.0.1, ready once ``/health`` answers.

    A port taken between picking it and binding it is retried on another one (twice).

    Args:
        config_path: the TOML file to serve; None for the embedded default.
        startup_timeout: seconds to wait for ``/health`` before giving up.
    """

    def __init__(self, config_path: str | None, *, startup_timeout: float = 30.0) -> None:
        config = ["--config", config_path] if config_path is not None else []
        super().__init__(
            "serve",
            *config,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--log-level",
            "warning",
            name="gateway",
            startup_timeout=startup_timeout,
            port_retries=2,
        )
        self.config_path = config_path

    def ready(self) -> bool:
        return http_status(self.port, "/health") is not None  # any HTTP answer: it is up

    def start(self) -> None:
        """Start and wait until it answers.

        Raises:
            ToolError: it exited or did not answer in time (with its last log line).
        """
        try:
            super().start()
        except ServerStartError as exc:
            raise ToolError(f"the gateway did not start: {exc.last_line or 'no output'}") from None

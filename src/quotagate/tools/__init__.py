"""Operator tools behind ``quotagate verify`` and ``quotagate bench``.

They sit above the gateway (they drive one over HTTP, or start one) and below the CLI, which
only registers their click commands.
"""

__all__: list[str] = []

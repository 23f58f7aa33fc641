"""What answers are likely to cost: the recent 95th percentile of completion tokens, per client
and model, and per tier and model for a client with no history yet.

With ``[tiers.X] reserve = "estimate"`` a request reserves this many output tokens rather than
its whole ``max_tokens`` (a 4096 cap over 200-token answers would hold twenty times what is
used); what it may really generate is enforced while it is produced (``Gateway``: the stream
cut, or ``max_tokens`` injected upstream). Bounded memory: the last ``window`` answers per
entry (about 1 kB), and at ``size`` entries (20,000: some 20 MB) the table starts again empty;
only the tiers that reserve so are recorded.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Estimates"]


class Estimates:
    def __init__(self, window: int = 64, size: int = 20_000) -> None:
        self.window = window
        self.size = size
        self._seen: dict[tuple[str, str], deque[int]] = {}

    def p95(self, client: str, tier: str, model: str | None) -> int | None:
        """The client's recent p95 for ``model``, else its tier's, else None (no answers yet)."""
        for who in (client, "tier:" + tier):
            seen = self._seen.get((who, model or ""))
            if seen:
                ordered = sorted(seen)
                return ordered[min(len(ordered) - 1, (95 * len(ordered)) // 100)]
        return None

    def add(self, client: str, tier: str, model: str | None, completion: int) -> None:
        """One served answer's completion tokens."""
        if len(self._seen) >= self.size:
            self._seen.clear()
        for who in (client, "tier:" + tier):
            seen = self._seen.get((who, model or ""))
            if seen is None:
                seen = self._seen[(who, model or "")] = deque(maxlen=self.window)
            seen.append(completion)

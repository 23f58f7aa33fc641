"""The over-limit cache: a client just told "retry in T" is told so again, in process, until T
has passed (Envoy's rate limit service does the same), so an abusive client costs the shared
storage nothing while it hammers.

A cached rejection answers only the same question: the same state keys (every key, rate and
algorithm of the request) at a cost no lower than the one rejected. A refund on any of those
keys may let the request pass sooner, so it drops the entries that hold the key. Bounded: at
``size`` entries the table starts again empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ._types import Clock
from .decision import Decision, LimitState

__all__ = ["OverlimitCache"]

_Entry = tuple[float, tuple[int, ...], Decision]  # (until, costs, the rejection)


class OverlimitCache:
    def __init__(self, clock: Clock, size: int = 100_000) -> None:
        self.clock = clock
        self.size = size
        self._entries: dict[tuple[str, ...], _Entry] = {}
        self._by_key: dict[str, set[tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, question: tuple[str, ...], costs: Sequence[int]) -> Decision | None:
        """The cached rejection of ``question`` at ``costs``, its waits brought up to now."""
        entry = self._entries.get(question)
        if entry is None:
            return None
        until, cached_costs, decision = entry
        wait = until - self.clock()
        if wait <= 0:
            del self._entries[question]
            return None
        if any(cost < old for cost, old in zip(costs, cached_costs, strict=True)):
            return None  # a cheaper request is a different question
        elapsed = decision.retry_after - wait
        return Decision(
            False,
            "limited",
            wait,
            decision.limit,
            decision.remaining,
            max(0.0, decision.reset_after - elapsed),
            tuple(
                LimitState(
                    s.key,
                    s.rate,
                    s.limit,
                    s.remaining,
                    max(0.0, s.reset_after - elapsed),
                    max(0.0, s.retry_after - elapsed),
                    s.name,
                )
                for s in decision.states
            ),
            None,
            decision.name,
        )

    def remember(
        self, question: tuple[str, ...], costs: tuple[int, ...], decision: Decision
    ) -> None:
        if len(self._entries) >= self.size:
            self.clear()
        self._entries[question] = (self.clock() + decision.retry_after, costs, decision)
        for state_key in question:
            self._by_key.setdefault(state_key, set()).add(question)

    def forget(self, state_keys: Iterable[str]) -> None:
        """A refund may let a cached rejection pass sooner: drop the entries it touches."""
        for state_key in state_keys:
            for question in self._by_key.pop(state_key, ()):
                self._entries.pop(question, None)

    def clear(self) -> None:
        self._entries.clear()
        self._by_key.clear()

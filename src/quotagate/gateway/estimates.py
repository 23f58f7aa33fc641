"""What answers are likely to cost: the recent 95th percentile of completion tokens, per client
and model, and per tier and model for a client with no history yet.

With ``[tiers.X] reserve = "estimate"`` a request reserves this many output tokens rather than
its whole ``max_tokens`` (a 4096 cap over 200-token answers would hold twenty times what is
used); an answer that outgrows it reserves more as it grows (``Gateway``). Bounded memory: the
last ``window`` answers per entry (about 1 kB), and at ``size`` entries (20,000: some 20 MB) a
table starts again empty; only the tiers that reserve so are recorded.

Replicas on one shared storage share what they saw (``sync``, every second): each adds its
answers to a histogram per client (and per tier) in the storage, and reads back the histograms
of the clients it was asked about, so a client's next request on any replica reserves by all
of its answers. A histogram counts answers of the last 10 to 20 minutes (two generations of
``GENERATION_S``), in buckets of at most 1/32 of their size (exact to 64 tokens), and the p95
is read as its bucket's upper edge: never below the answers it summarises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import cast

from ..errors import StorageError
from ..limiter import RateLimiter, Tally

__all__ = ["GENERATION_S", "Estimates", "answers_key", "bucket", "p95_of"]

logger = logging.getLogger("quotagate")

#: How long one histogram of a client's answers is written to; two are read.
GENERATION_S = 600


def answers_key(who: str, generation: int) -> str:
    """The shared histogram of ``who``'s answers (a client or ``tier:<name>``) in one
    generation: in the hash tag of the client's own limits."""
    return "{" + who + "}:answers:" + str(generation)


def bucket(tokens: int) -> int:
    """``tokens`` rounded up to its histogram bucket: six significant bits."""
    shift = max(0, tokens.bit_length() - 6)
    return -(-tokens >> shift) << shift


def p95_of(counts: dict[int, int]) -> int | None:
    """The 95th percentile of a histogram of ``{tokens: answers}``, as ``Estimates`` ranks."""
    total = sum(counts.values())
    if not total:
        return None
    rank = min(total - 1, (95 * total) // 100)
    for tokens in sorted(counts):
        rank -= counts[tokens]
        if rank < 0:
            return tokens
    return None  # unreachable: the ranks add up to total


class Estimates:
    def __init__(
        self, window: int = 64, size: int = 20_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.window = window
        self.size = size
        self.clock = clock
        #: Replicas share through the storage (a shared one: Redis); memory keeps to itself.
        self.shared = False
        self._seen: dict[tuple[str, str], deque[int]] = {}
        # The shared side: answers to add, entries asked about since the last sync, and the
        # histograms read back for them.
        self._unsent: defaultdict[tuple[str, int], Counter[str]] = defaultdict(Counter)
        self._asked: set[str] = set()
        self._fleet: dict[str, dict[str, dict[int, int]]] = {}  # who -> model -> histogram

    def p95(self, client: str, tier: str, model: str | None) -> int | None:
        """The client's recent p95 for ``model``, else its tier's, else None (no answers yet):
        every replica's answers where they are shared, else this one's."""
        whose = (client, "tier:" + tier)
        if self.shared:
            self._asked.update(whose)  # both read at the next sync: neither is left stale
        for who in whose:
            entry = (who, model or "")
            if self.shared:
                counts = self._fleet.get(who, {}).get(model or "")
                if counts:
                    return p95_of(counts)
            seen = self._seen.get(entry)
            if seen:
                ordered = sorted(seen)
                return ordered[min(len(ordered) - 1, (95 * len(ordered)) // 100)]
        return None

    def add(self, client: str, tier: str, model: str | None, completion: int) -> None:
        """One served answer's completion tokens."""
        if len(self._seen) >= self.size:
            self._seen.clear()
        generation = int(self.clock() // GENERATION_S)
        for who in (client, "tier:" + tier):
            seen = self._seen.get((who, model or ""))
            if seen is None:
                seen = self._seen[(who, model or "")] = deque(maxlen=self.window)
            seen.append(completion)
            if self.shared and len(self._unsent) < self.size:
                self._unsent[(who, generation)][f"{model or ''}|{bucket(completion)}"] += 1

    async def sync(self, limiter: RateLimiter) -> None:
        """Add this replica's answers to the shared histograms, and read back those of the
        clients asked about: the storage calls of a second, run together."""
        unsent, self._unsent = self._unsent, defaultdict(Counter)
        asked, self._asked = self._asked, set()
        if not unsent and not asked:
            return
        keep = 2 * GENERATION_S
        writes = [
            limiter.settle([], None, Tally(answers_key(who, gen), tuple(counts.items()), keep))
            for (who, gen), counts in unsent.items()
        ]
        now = int(self.clock() // GENERATION_S)
        who_list = sorted(asked)
        keys = [answers_key(who, g) for who in who_list for g in (now, now - 1)]
        try:
            done = await asyncio.gather(limiter.tallies(keys), *writes)
        except StorageError as exc:  # the next request reserves by this replica's answers
            logger.warning("quotagate: storage error while sharing answer estimates: %s", exc)
            return
        read = cast(list[dict[str, int]], done[0])
        if len(self._fleet) >= self.size:
            self._fleet.clear()
        for at, who in enumerate(who_list):
            merged: dict[str, dict[int, int]] = {}
            for counts in read[2 * at : 2 * at + 2]:
                for field, answers in counts.items():
                    model, _, tokens = field.rpartition("|")
                    if tokens.isdigit():
                        histogram = merged.setdefault(model, {})
                        histogram[int(tokens)] = histogram.get(int(tokens), 0) + answers
            if merged:
                self._fleet[who] = merged
            else:
                self._fleet.pop(who, None)  # its answers are older than two generations

"""The usage ledger: per account, UTC day and model, the requests admitted and rejected (by a
limit) and the prompt and completion tokens, as settled on the real usage.

An account is an issued key's id (``key_...``), a config key's (``cfg_...``), or an anonymous
tier (``tier:<name>``). Each account's day is one hash in the storage, beside the account's
limits (the same hash tag: one Cluster slot), with fields ``<model>|<count>``; it is written by
the request's own calls, never by one more: a rejection by the decision, a served request by
its settlement (an upstream failure that refunds everything counts nothing). Kept
``retention_days`` after its last write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from ..limiter import Tally
from .callers import Caller
from .relay import Used

__all__ = ["COUNTS", "GroupBy", "UsageBook", "account_client", "days", "rows", "usage_key"]

#: The figures of a row, in order.
COUNTS = ("requests_admitted", "requests_rejected", "prompt_tokens", "completion_tokens")
GroupBy = Literal["day", "model", "key"]


def usage_key(client: str, day: date) -> str:
    """The hash of one account's day: in the hash tag of the client its limits count."""
    return "{" + client + "}:usage:" + day.isoformat()


class UsageBook:
    """What the ledger writes for each request, and how its rows are summed."""

    def __init__(
        self,
        retention_days: int = 400,
        clock: Callable[[], float] = time.time,
        *,
        cluster: bool = False,
    ) -> None:
        self.retention_s = retention_days * 86_400.0
        self.clock = clock
        # On Redis Cluster an anonymous tier's hash is in another slot than the caller's
        # limits (its address's): its counts go in a call of their own.
        self.cluster = cluster

    def apart(self, caller: Caller) -> bool:
        """Whether ``caller``'s counts cannot ride on its own calls (see ``cluster``)."""
        return self.cluster and account_client(caller) != caller.client

    def today(self) -> date:
        return datetime.fromtimestamp(self.clock(), UTC).date()

    def rejected(self, caller: Caller, model: str | None) -> Tally:
        return self._tally(caller, model, (("requests_rejected", 1),))

    def served(self, caller: Caller, model: str | None, used: Used) -> Tally:
        counts = (
            ("requests_admitted", 1),
            ("prompt_tokens", used.prompt),
            ("completion_tokens", used.completion),
        )
        return self._tally(caller, model, counts)

    def _tally(
        self, caller: Caller, model: str | None, counts: tuple[tuple[str, int], ...]
    ) -> Tally:
        name = model or "-"
        fields = tuple((f"{name}|{count}", n) for count, n in counts if n)
        return Tally(usage_key(account_client(caller), self.today()), fields, self.retention_s)


def account_client(caller: Caller) -> str:
    """Whose hash a caller's usage goes in: its key's client, or its anonymous tier."""
    return caller.client if caller.client.startswith("key:") else "tier:" + caller.tier.name


def days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def rows(
    tallies: Iterable[tuple[str, date, dict[str, int]]], group_by: GroupBy
) -> list[dict[str, object]]:
    """Sum ``(account, day, hash)`` tallies into rows by day, model or key, in that order."""
    summed: dict[str, dict[str, int]] = {}
    for account, day, counts in tallies:
        for field, n in counts.items():
            model, _, count = field.rpartition("|")
            if count not in COUNTS:
                continue
            group = {"day": day.isoformat(), "model": model, "key": account}[group_by]
            row = summed.setdefault(group, dict.fromkeys(COUNTS, 0))
            row[count] += n
    return [{group_by: group, **summed[group]} for group in sorted(summed)]

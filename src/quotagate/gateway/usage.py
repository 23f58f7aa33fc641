"""The usage ledger: per account, UTC day and model, the requests admitted and rejected (by a
limit), the prompt and completion tokens and what they cost (``cost_usd``, from the model's
price), as settled on the real usage.

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
from .budgets import MICROS
from .callers import Caller
from .relay import Used

__all__ = ["COUNTS", "GroupBy", "UsageBook", "account_client", "days", "rows", "usage_key"]

#: The figures of a row, in order (money is counted in micro-dollars, shown as ``cost_usd``).
COUNTS = (
    "requests_admitted",
    "requests_rejected",
    "prompt_tokens",
    "completion_tokens",
    "cost_micro_usd",
)
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
        # What every request would build again: today's keys and each model's field names
        # (and a rejection's whole tally), for the day they were made on.
        self._day = -1
        self._today = date.min
        self._keys: dict[str, str] = {}
        self._rejected: dict[tuple[str, str | None], Tally] = {}
        self._fields: dict[str | None, tuple[str, str, str, str]] = {}

    def apart(self, caller: Caller) -> bool:
        """Whether ``caller``'s counts cannot ride on its own calls (see ``cluster``)."""
        return self.cluster and account_client(caller) != caller.client

    def today(self) -> date:
        day = int(self.clock() // 86_400)
        if day != self._day:
            self._day, self._today = day, datetime.fromtimestamp(day * 86_400, UTC).date()
            self._keys.clear()
            self._rejected.clear()
        return self._today

    def rejected(self, caller: Caller, model: str | None) -> Tally:
        self.today()
        tally = self._rejected.get((caller.client, model))
        if tally is None:
            if len(self._rejected) > _MEMO:
                self._rejected.clear()
            field = (model or "-") + "|requests_rejected"
            tally = Tally(self._key(caller), ((field, 1),), self.retention_s)
            self._rejected[(caller.client, model)] = tally
        return tally

    def served(self, caller: Caller, model: str | None, used: Used, cost: int = 0) -> Tally:
        """A served request's counts; ``cost`` in micro-dollars (its model's price)."""
        self.today()
        fields = self._fields.get(model)
        if fields is None:
            if len(self._fields) > _MEMO:
                self._fields.clear()
            name = model or "-"
            fields = self._fields[model] = (
                name + "|requests_admitted",
                name + "|prompt_tokens",
                name + "|completion_tokens",
                name + "|cost_micro_usd",
            )
        admitted, prompt, completion, money = fields
        counts: tuple[tuple[str, int], ...] = (
            (admitted, 1),
            (prompt, used.prompt),
            (completion, used.completion),
        )
        if cost:
            counts += ((money, cost),)
        return Tally(self._key(caller), counts, self.retention_s)

    def _key(self, caller: Caller) -> str:
        key = self._keys.get(caller.client)
        if key is None:
            if len(self._keys) > _MEMO:
                self._keys.clear()
            key = self._keys[caller.client] = usage_key(account_client(caller), self._today)
        return key


#: Most entries of each of the book's memos before it starts over.
_MEMO = 100_000


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
    return [{group_by: group, **_shown(summed[group])} for group in sorted(summed)]


def _shown(counts: dict[str, int]) -> dict[str, object]:
    """A row's figures as the API gives them: money in USD (exact to the micro-dollar)."""
    shown: dict[str, object] = {k: v for k, v in counts.items() if k != "cost_micro_usd"}
    shown["cost_usd"] = round(counts["cost_micro_usd"] / MICROS, 6)
    return shown

"""What ``verify`` and ``bench`` share: one-line errors with exit code 2, masked command lines,
percentiles."""

from __future__ import annotations

import math
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

from ..identity import mask_key
from ..storage import mask_url

__all__ = [
    "OneLineErrorsCommand",
    "ToolError",
    "command_argv",
    "mask_password",
    "masked_command",
    "percentile",
]


class ToolError(click.ClickException):
    """A usage or connection error: ``Error: <one line>`` on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class OneLineErrorsCommand(click.Command):
    """A click command whose usage errors are one line too (click's own are three: usage,
    hint, error), so that scripts and operators get the same shape for every exit 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        raw = list(args)  # parsing consumes the list; the evidence record wants it as typed
        try:
            context = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            name = info_name or self.name or "command"
            raise ToolError(f"{exc.format_message()} (see: quotagate {name} --help)") from None
        context.meta["quotagate.argv"] = ["quotagate", info_name or self.name or "", *raw]
        return context


def command_argv() -> list[str]:
    """The running command as typed (``quotagate verify --key ...``), from the click context."""
    context = click.get_current_context()
    argv = context.meta.get("quotagate.argv")
    return list(argv) if isinstance(argv, list) else ["quotagate", *sys.argv[1:]]


def masked_command(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The command line with API keys masked and URL passwords starred.

    Masks the value after ``--key`` (and ``--key=...``), any argument holding one of
    ``secrets``, and the password of any URL.
    """
    args = list(argv)
    known = {secret for secret in secrets if secret}
    masked: list[str] = []
    after_key = False
    for arg in args:
        if after_key:
            masked.append(mask_key(arg))
            after_key = False
        elif arg == "--key":
            masked.append(arg)
            after_key = True
        elif arg.startswith("--key="):
            masked.append("--key=" + mask_key(arg.removeprefix("--key=")))
        elif arg in known:
            masked.append(mask_key(arg))
        else:
            for secret in known:
                if secret in arg:
                    arg = arg.replace(secret, mask_key(secret))
            masked.append(mask_password(arg) if "://" in arg else arg)
    return shlex.join(masked)


def mask_password(text: str) -> str:
    """``text`` with the password of any URL in it starred (never raises)."""
    try:
        return mask_url(text)
    except ValueError:  # not a URL urllib can split: star anything shaped like user:pass@
        return re.sub(r"(//[^/:@\s]*:)[^@/\s]*@", r"\1***@", text)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when it is empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]

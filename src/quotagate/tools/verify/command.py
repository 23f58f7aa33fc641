"""The ``quotagate verify`` command: flags checked, then set-up -> starting state -> checks ->
record, one call each."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import click

from .._common import OneLineErrorsCommand, ToolError, command_argv, masked_command
from .evidence import evidence_record
from .run import run_checks
from .setup import check_url, open_gateway
from .state import gather_starting_state, starting_state_lines

__all__ = ["verify_command"]


def _check_flags(url: str | None, keys: tuple[str, ...], tier: str | None, restart: bool) -> None:
    """Raise ToolError (exit 2) for a combination of flags verify cannot run."""
    if len(keys) not in (0, 2):
        raise ToolError(
            "give two API keys, --key K1 --key K2, to check they are counted apart "
            f"(got {len(keys)})"
        )
    if len(keys) == 2 and keys[0] == keys[1]:
        raise ToolError("the two --key values are the same key")
    if url is not None:
        if not keys:
            raise ToolError("--url: give two API keys the gateway knows, --key K1 --key K2")
        if restart:
            raise ToolError("--restart needs a gateway that verify starts itself (drop --url)")
        if tier is not None:
            raise ToolError("--tier applies only to a gateway that verify starts itself")
        check_url(url)


@click.command(
    "verify", cls=OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--url", help="A running gateway to check (else one is started here).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Gateway config: what to start, or what the --url gateway runs.",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="KEY",
    help="An API key; give two. Without --url they may be omitted: two throwaway "
    "keys are added to the config of the gateway started here.",
)
@click.option("--tier", help="Tier for keys the config does not list (default: free).")
@click.option(
    "--restart",
    is_flag=True,
    help="Also check that counters reset: restart the gateway (memory) or delete the "
    "counters under its Redis prefix. Only for a gateway started here.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Write the evidence record as JSON.",
)
@click.option("--model", help="Model to request (default: the first of /v1/models).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds per request.",
)
def verify_command(
    url: str | None,
    config_path: str | None,
    keys: tuple[str, ...],
    tier: str | None,
    restart: bool,
    report_path: str | None,
    model: str | None,
    timeout: float,
) -> None:
    """Run the tutorial's verification checks against a gateway and record the evidence.

    Exit 0 when every check passes, 1 when one fails, 2 on a usage or connection error.
    """
    command = masked_command(command_argv(), secrets=keys)
    _check_flags(url, keys, tier, restart)
    started, started_at = time.perf_counter(), dt.datetime.now(dt.UTC)
    with open_gateway(
        url=url,
        config_path=config_path,
        keys=keys,
        tier=tier,
        timeout=timeout,
        started=started,
        restart=restart,
    ) as gateway:
        environment = gather_starting_state(gateway, model)
        for line in starting_state_lines(environment):
            click.echo(line)
        checks = run_checks(gateway, environment, restart=restart, echo=click.echo)
    record = evidence_record(command, started_at, environment, checks)
    passed = sum(check.passed for check in checks)
    summary = f"{len(checks)} checks: {passed} passed, {len(checks) - passed} failed"
    if report_path is not None:
        text = json.dumps(record, indent=2, ensure_ascii=False)
        Path(report_path).write_text(text + "\n", "utf-8")
        summary += f" · evidence written to {report_path}"
    click.echo(summary)
    click.get_current_context().exit(0 if record["passed"] else 1)

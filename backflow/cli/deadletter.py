"""``backflow deadletter list | show | retry``: what the stages refused, and trying again.

Wired into the ``backflow`` group by backflow/cli/main.py; the reading and
re-publishing is backflow/deadletters.py. Every text shown comes from
strangers (reasons quote input), so it goes through ``printable``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import click

from backflow.cli.terminal import printable
from backflow.deadletters import (
    DeadLetterError,
    Filter,
    Scan,
    Stored,
    find,
    parse_when,
    retry,
    scan,
)
from topics.codec import to_dict
from topics.deadletter import Stage
from topics.settings import Settings


def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj["settings"]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options every subcommand shares."""
    options = [
        click.option(
            "--stage", type=click.Choice([s.value for s in Stage]), help="Refusing stage."
        ),
        click.option("--reason", help="Reason contains this text (any case)."),
        click.option("--source", help="Source contains this text (topic, file name, http:)."),
        click.option("--portal", help="Portal key network:portal, exactly."),
        click.option(
            "--since", help="Dead-lettered at or after: 2024-05-01[T12:00] or 3h, 2d ago."
        ),
        click.option("--until", help="Dead-lettered before (same forms)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_filter(
    stage: str | None,
    reason: str | None,
    source: str | None,
    portal: str | None,
    since: str | None,
    until: str | None,
) -> Filter:
    try:
        return Filter(
            stage=stage,
            reason=reason,
            source=source,
            key=portal,
            since=parse_when(since) if since else None,
            until=parse_when(until) if until else None,
        )
    except DeadLetterError as exc:
        raise click.BadParameter(str(exc)) from None


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except DeadLetterError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("deadletter")
def deadletter() -> None:
    """Inspect dead letters and re-publish those whose cause is fixed."""


@deadletter.command("list")
@filters
@click.option("--limit", default=50, show_default=True, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_command(ctx: click.Context, limit: int, as_json: bool, **selection: str | None) -> None:
    """Dead letters matching the filters, oldest first per partition."""
    where = make_filter(**selection)
    settings = _settings(ctx)

    async def collect() -> tuple[list[Stored], Scan]:
        stats = Scan()
        shown: list[Stored] = []
        async with aclosing(scan(settings, where, stats)) as letters:
            async for stored in letters:
                if len(shown) < limit:
                    shown.append(stored)
        return shown, stats

    shown, stats = _run(collect())
    for stored in shown:
        letter = stored.letter
        if as_json:
            click.echo(json.dumps({"id": stored.id, **to_dict(letter)}))
            continue
        reason = letter.reason if len(letter.reason) <= 160 else letter.reason[:160] + "..."
        click.echo(
            f"{stored.id}  {_when(letter.ts)}  {letter.stage:8} {printable(letter.source or '-')}  "
            f"{printable(letter.key or '-')}\n    {printable(reason)}"
        )
    if not as_json:
        more = f", showing {len(shown)}" if stats.matched > len(shown) else ""
        bad = f", {stats.unreadable} unreadable" if stats.unreadable else ""
        click.echo(f"{stats.matched} of {stats.read} dead letters match{more}{bad}")


@deadletter.command("show")
@click.argument("letter_id")
@click.pass_context
def show_command(ctx: click.Context, letter_id: str) -> None:
    """One dead letter in full: LETTER_ID as `list` prints it (or PARTITION@OFFSET)."""
    stored = _run(find(_settings(ctx), letter_id))
    if stored is None:
        raise click.ClickException(f"no dead letter {printable(letter_id)}")
    letter = stored.letter
    click.echo(f"id:       {stored.id}")
    click.echo(f"when:     {_when(letter.ts)} UTC")
    click.echo(f"stage:    {letter.stage}")
    click.echo(f"source:   {printable(letter.source or '-')}")
    click.echo(f"portal:   {printable(letter.key or '-')}")
    click.echo(f"reason:   {printable(letter.reason)}")
    click.echo("original:")
    click.echo(printable(letter.original))


@deadletter.command("retry")
@filters
@click.option("--dry-run", is_flag=True, help="Say what would be re-published; publish nothing.")
@click.pass_context
def retry_command(ctx: click.Context, dry_run: bool, **selection: str | None) -> None:
    """Re-publish matching dead letters whose original the stages accept now (once each)."""
    where = make_filter(**selection)
    if where == Filter() and not dry_run:
        raise click.UsageError(
            "give at least one filter (--stage, --reason, --source, --portal, --since, --until); "
            "try --dry-run first"
        )
    result = _run(retry(_settings(ctx), where, dry_run=dry_run))
    for line in result.lines:
        click.echo(printable(line))
    if sum(result.counts.values()) > len(result.lines):
        click.echo(f"(only the first {len(result.lines)} shown)")
    totals = ", ".join(f"{n} {outcome}" for outcome, n in sorted(result.counts.items()))
    click.echo(f"{result.scan.matched} matched: {totals or 'nothing to do'}")
    if result.counts.get("still failing"):
        ctx.exit(1)

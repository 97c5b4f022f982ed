"""``backflow replay``: re-send a portal's history from the log into its room.

Wired into the ``backflow`` group by backflow/cli/main.py; the reading,
deciding and publishing is backflow/replay.py (the decision itself is
backflow/replay_plan.py). Message ids and names come from strangers, so
everything shown goes through ``printable``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import click

from backflow.cli.terminal import printable
from backflow.deadletters import DeadLetterError, parse_when
from backflow.rebuild import PortalRebuild, replay_rebuild
from backflow.replay import PortalReplay, ReplayError, Selection, replay_catchup
from topics.settings import Settings

SHOWN = 20  # messages listed per portal


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (ReplayError, DeadLetterError) as exc:
        raise click.ClickException(str(exc)) from None


def _time(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_when(text)
    except DeadLetterError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@click.command("replay")
@click.option(
    "--portal",
    "portals",
    multiple=True,
    help="Portal key network:portal (or its room id / alias); repeatable.",
)
@click.option("--network", help="Every portal of this network (with --portal: only those).")
@click.option("--all", "everything", is_flag=True, help="Every portal that has a room.")
@click.option(
    "--mode",
    type=click.Choice(["catchup", "rebuild"]),
    default="catchup",
    show_default=True,
    help="catchup: send into the existing room what it never got and is newer than its "
    "last bridged message. rebuild: a fresh room with the full history, the old one "
    "tombstoned towards it (an unfinished rebuild is resumed).",
)
@click.option(
    "--since", help="Only messages at or after this network time: 2024-05-01[T12:00], 3h."
)
@click.option("--until", help="Only messages before this network time (same forms).")
@click.option("--dry-run", is_flag=True, help="Print per portal what would be sent; send nothing.")
@click.pass_context
def replay(
    ctx: click.Context,
    portals: tuple[str, ...],
    network: str | None,
    everything: bool,
    mode: str,
    since: str | None,
    until: str | None,
    dry_run: bool,
) -> None:
    """Re-read portals' history from the log and send what their rooms are missing."""
    if not (portals or network or everything):
        raise click.UsageError("choose portals: --portal P, --network N or --all")
    if everything and (portals or network):
        raise click.UsageError("--all selects every portal: drop --portal / --network")
    selection = Selection(
        portals=portals,
        network=network,
        all=everything,
        since=_time("--since", since),
        until=_time("--until", until),
    )
    settings: Settings = ctx.find_root().obj["settings"]
    if mode == "rebuild":
        result = _run(replay_rebuild(settings, selection, dry_run=dry_run))
    else:
        result = _run(replay_catchup(settings, selection, dry_run=dry_run))
    for value in result.missing:
        click.echo(
            f"{printable(value)}: no room in the sink's store (the pipeline creates and "
            "backfills it; nothing to catch up)"
        )
    for p in result.portals:
        _show(p, dry_run)
    total = sum(len(p.plan.send) for p in result.portals if p.plan)
    verb = "would send" if dry_run else "published"
    bad = f", {result.unreadable} unreadable" if result.unreadable else ""
    click.echo(
        f"{len(result.portals)} portal(s), {result.read} log records read{bad}: "
        f"{verb} {total} message(s)"
        + ("" if dry_run or not total else "; the sink puts them in the rooms")
    )
    if result.missing and not result.portals:
        ctx.exit(1)


def _show(p: PortalReplay | PortalRebuild, dry_run: bool) -> None:
    assert p.plan is not None
    sends = p.plan.send
    verb = "would send" if dry_run else "sending"
    if isinstance(p, PortalRebuild):
        how = "resuming" if p.resumed else "starting"
        new = printable(p.new_room) if p.new_room else "not created yet"
        click.echo(
            f"{printable(p.key)}  {how} rebuild {p.name}: old room {printable(p.old_room)}, "
            f"new room {new}: {verb} {len(sends)}"
        )
        for step in p.steps:
            click.echo(f"    {'would ' if dry_run else ''}{step}")
    else:
        click.echo(
            f"{printable(p.key)}  room {printable(p.room_id)}  last bridged "
            f"{_when(p.last_bridged_ts)}: {verb} {len(sends)}"
        )
    for m in sends[:SHOWN]:
        part = f" part {m.part}" if m.part else ""
        click.echo(
            f"    {_when(m.ts)}  {printable(m.id)}{part}  {m.content.kind}  "
            f"from {printable(m.sender.name or m.sender.id)}"
        )
    if len(sends) > SHOWN:
        click.echo(f"    ... and {len(sends) - SHOWN} more")
    if p.plan.skipped:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(p.plan.skipped.items()))
        click.echo(f"    not sent: {skipped}")

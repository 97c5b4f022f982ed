"""CLI commands of the sink: ``backflow sink`` and ``backflow show``.

Both expect the settings object in ``ctx.obj["settings"]`` (the ``backflow``
group puts it there). Unreachable services end in one error line, exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from backflow.cli.terminal import printable
from connectors.matrix.client import MatrixRequestError, describe
from connectors.matrix.ghosts import room_alias
from connectors.matrix.registration import load_registration
from connectors.matrix.runner import open_client, run_sink
from connectors.matrix.sink import SinkError, naming_templates
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import SinkStore, StoreUnreachable
from topics.settings import Settings

PROGRESS_INTERVAL = 10.0


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.obj or {}
    settings = obj.get("settings") if isinstance(obj, dict) else None
    if settings is None:
        raise click.ClickException("internal: no settings in the click context")
    return settings


def progress_printer(
    echo: Any = click.echo, interval: float = PROGRESS_INTERVAL
) -> Callable[[SinkStats], None]:
    """The sink's progress line: at most every ``interval`` s, whenever anything moved."""
    last: list = [float("-inf"), None]

    def progress(stats: SinkStats) -> None:
        now = time.monotonic()
        # Print when anything moved, sends included: all commands may be
        # fetched long before they are sent.
        seen = (stats.commands, stats.sent, stats.dead_letters)
        if now - last[0] >= interval and seen != last[1]:
            last[0], last[1] = now, seen
            rooms = ", ".join(f"{k} {n}" for k, n in sorted(stats.per_room.items())[:10])
            echo(f"sink: {stats.summary()}" + (f" | {rooms}" if rooms else ""))

    return progress


async def sink_until_signal(settings: Settings, echo: Any = click.echo) -> SinkStats:
    """Run the sink until SIGINT/SIGTERM, echoing room progress and a periodic summary."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (RuntimeError, NotImplementedError, ValueError):
            pass  # not the main thread (embedded use): the caller stops us
    progress = progress_printer(echo)

    try:
        stats = await run_sink(settings, stop=stop, on_progress=progress)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    echo(f"sink stopped: {stats.summary()}")
    return stats


@click.command("sink")
@click.option("-v", "--verbose", is_flag=True, help="Log every room and retry.")
@click.pass_context
def sink_command(ctx: click.Context, verbose: bool) -> None:
    """Run the Matrix sink: create portal rooms and send the command topic's messages."""
    settings = _settings(ctx)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(sink_until_signal(settings))
    except SinkError as exc:
        raise click.ClickException(str(exc)) from None


async def timeline_lines(settings: Settings, portal_or_room: str) -> list[str]:
    """The room's timeline as Synapse has it, oldest first: time (UTC), sender, body.

    Accepts a room id (``!x:server``), an alias (``#..``), ``network:portal``
    or a portal id known to the sink's database.
    """
    try:
        registration = load_registration(settings.appservice.registration)
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    client = await open_client(settings, registration)
    try:
        room_id = await _find_room(settings, client, registration, portal_or_room)
        try:
            events = await client.timeline(
                room_id, types=["m.room.message", "m.reaction", "m.room.redaction"]
            )
        except MatrixRequestError as exc:
            raise SinkError(f"cannot read {room_id}: {describe(exc)}") from None
    finally:
        await client.close()
    return [format_event(e) for e in events]


async def _find_room(settings: Settings, client: Any, registration: Any, value: str) -> str:
    if value.startswith("!"):
        return value
    if value.startswith("#"):
        room = await client.resolve_alias(value)
        if room is None:
            raise SinkError(f"no room has the alias {value}")
        return room
    try:
        store = await SinkStore.open(settings.database.url, size=1)
    except StoreUnreachable as exc:
        raise SinkError(str(exc)) from None
    try:
        row = await store.room_by_alias_or_id(value)
    finally:
        await store.close()
    if row is not None:
        return str(row["room_id"])
    network, sep, portal = value.partition(":")
    if sep and settings.homeserver.server_name:
        _, templates = naming_templates(settings, registration)
        server = settings.homeserver.server_name
        alias = room_alias(registration.alias_prefix, network, portal, server, templates)
        room = await client.resolve_alias(alias)
        if room is not None:
            return room
    raise SinkError(f"no portal room found for {value!r} (try network:portal or a room id)")


def format_event(event: dict[str, Any]) -> str:
    ts = datetime.fromtimestamp(event.get("origin_server_ts", 0) / 1000, UTC)
    when = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    content = event.get("content") or {}
    if event["type"] == "m.reaction":
        rel = content.get("m.relates_to") or {}
        body = f"[reaction {rel.get('key')} to {rel.get('event_id')}]"
    elif event["type"] == "m.room.redaction":
        body = f"[redacted {content.get('redacts') or event.get('redacts')}]"
    elif not content:
        body = "[redacted]"
    else:
        body = str(content.get("body", ""))
        msgtype = content.get("msgtype", "")
        if msgtype not in ("m.text", "m.notice", "m.emote", ""):
            body = f"[{msgtype.removeprefix('m.')}] {body}"
    return f"{when}  {event.get('sender')}  {body}"


@click.command("show")
@click.argument("portal_or_room")
@click.pass_context
def show_command(ctx: click.Context, portal_or_room: str) -> None:
    """Print a portal room's timeline as the homeserver has it, oldest first."""
    settings = _settings(ctx)
    try:
        lines = asyncio.run(timeline_lines(settings, portal_or_room))
    except SinkError as exc:
        raise click.ClickException(str(exc)) from None
    for line in lines:
        click.echo(printable(line))

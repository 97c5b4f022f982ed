"""`backflow demo` (what `make demo` runs): the whole path on embedded services.

Starts the embedded stack if it is not running, imports a small shuffled
history of three chats, runs a pipeline worker and the sink until every
message is in its room as Synapse reports it, then prints what it created.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import click
import orjson

from backflow.cli.topics import provision_settings
from backflow.processes import spawn, stop
from connectors.publish import publish_source
from connectors.sources.jsonl import JsonlSource
from topics.settings import Settings, load

DEMO_FILE = Path(__file__).with_name("demo.jsonl")
DEADLINE_S = 240


def expected_events(path: Path) -> dict[str, int]:
    """Events each demo portal should end up with: one per message record."""
    counts: Counter[str] = Counter()
    for line in path.read_bytes().splitlines():
        record = orjson.loads(line)
        if record["type"] == "message":
            counts[f"{record['network']}:{record['portal']}"] += 1
    return dict(counts)


async def room_timelines(settings: Settings, portals: list[str]) -> dict[str, list[str]]:
    from backflow.cli.sink import timeline_lines
    from connectors.matrix.sink import SinkError

    out: dict[str, list[str]] = {}
    for portal in portals:
        try:
            out[portal] = await timeline_lines(settings, portal)
        except SinkError:
            out[portal] = []  # room not created yet
    return out


def broker_label(settings: Settings) -> str:
    """What the stack's broker is: the in-memory mock, or the external one it was pointed at.

    Before the stack runs, ``kafka.bootstrap`` is set only by the operator
    (BACKFLOW_KAFKA_BOOTSTRAP), which the stack then uses instead of the mock.
    """
    if settings.kafka.bootstrap and not settings.kafka.mock_broker:
        return f"Kafka at {settings.kafka.bootstrap}"
    if not settings.kafka.bootstrap and os.environ.get("BACKFLOW_STACK_KAFKA") == "docker":
        return "Kafka in Docker"
    return "Kafka mock cluster in memory"


def run_demo(config: Path | None) -> None:
    from backflow.stack.daemon import read_env, start_background

    settings = load(config)
    if not read_env(settings.state_dir):
        click.echo(f"starting the embedded stack ({broker_label(settings)}, Postgres, Synapse) ...")
        start_background(settings.state_dir)
        settings = load(config)
    click.echo(f"broker: {broker_label(settings)}")
    asyncio.run(provision_settings(settings))

    click.echo(f"importing {DEMO_FILE.name}: three chats, shuffled ...")
    summary = asyncio.run(publish_source(JsonlSource(DEMO_FILE), settings))
    for line in summary.lines():
        click.echo(f"  {line}")

    expected = expected_events(DEMO_FILE)
    logs = settings.state_dir / "logs"
    click.echo(f"running a pipeline worker and the sink (logs in {logs}) ...")
    children = [spawn("worker", logs), spawn("sink", logs)]
    try:
        timelines = _wait_for_rooms(settings, expected, children)
    finally:
        stop(children)

    click.echo("")
    click.echo("Rooms on the homeserver (read back from Synapse):")
    for portal, lines in sorted(timelines.items()):
        click.echo(f"  {portal:18} {len(lines):3} events (expected {expected[portal]})")
    first = sorted(timelines)[0]
    click.echo("")
    click.echo(f"Look at a room:    .venv/bin/backflow show {first}")
    click.echo("Per-portal state:  .venv/bin/backflow status")
    click.echo("Stop the stack:    .venv/bin/backflow stack down")
    click.echo(f"Homeserver:        {settings.homeserver.url} ({settings.homeserver.server_name})")


def _wait_for_rooms(
    settings: Settings, expected: dict[str, int], children: list
) -> dict[str, list[str]]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        timelines = asyncio.run(room_timelines(settings, sorted(expected)))
        done = {p: len(timelines[p]) for p in expected}
        click.echo(
            "  " + ", ".join(f"{p} {done[p]}/{n}" for p, n in sorted(expected.items())),
        )
        if all(done[p] >= n for p, n in expected.items()):
            return timelines
        for child in children:
            if child.poll() is not None:
                raise click.ClickException(
                    f"{child.args[-1]} exited with {child.returncode}; "
                    f"see {settings.state_dir / 'logs' / (child.args[-1] + '.log')}"
                )
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"rooms incomplete after {DEADLINE_S}s; see {settings.state_dir / 'logs'}"
            )
        time.sleep(3)

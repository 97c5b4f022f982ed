"""`backflow demo` (what `make demo` runs): what backflow is for, on embedded services.

Starts the embedded stack if it is not running, then tells the story of
``backflow/demo_story.py`` with the bundled samples (``backflow/samples``:
chat histories as JSONL, a WhatsApp ``.txt`` export and a Telegram export),
prints a summary table read back from Synapse, and leaves the stack running.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import click

from backflow.cli.topics import provision_settings
from backflow.demo_story import Sample, Story, run_story, snapshot, summary_rows, table
from topics.settings import Settings, load

SAMPLES = Path(__file__).with_name("samples")
STORY = Story(
    history=(
        Sample("jsonl", SAMPLES / "chats.jsonl"),
        Sample("whatsapp", SAMPLES / "WhatsApp Chat - Book Club.txt"),
        Sample("telegram", SAMPLES / "telegram.json"),
    ),
    later=(Sample("jsonl", SAMPLES / "chats-later.jsonl"),),
    live=(Sample("jsonl", SAMPLES / "live.jsonl", live=True),),
    rebuild="demo:work",
    max_initial_conversations=2,
)
FIRST_PORTAL = "demo:family"
DEADLINE_S = 240


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

    started = time.monotonic()
    settings = load(config)
    if not read_env(settings.state_dir):
        click.echo(f"starting the embedded stack ({broker_label(settings)}, Postgres, Synapse) ...")
        start_background(settings.state_dir)
        settings = load(config)
    click.echo(f"broker: {broker_label(settings)}")
    asyncio.run(provision_settings(settings))
    logs = settings.state_dir / "logs"
    snap = asyncio.run(snapshot(settings))
    if FIRST_PORTAL in snap.rooms:
        # The story changes state (holds, a rebuild): told once per stack.
        click.echo("the demo already ran on this stack; its portals now:")
        rows = asyncio.run(summary_rows(settings, snap, set(snap.status)))
    else:
        try:
            rows = asyncio.run(run_story(settings, STORY, dict(os.environ), click.echo, logs))
        except RuntimeError as exc:
            raise click.ClickException(f"{exc}; see {logs}") from None
    click.echo("")
    click.echo("Portals (sent: events in the room, read back from Synapse):")
    for line in table(rows):
        click.echo(f"  {line}")
    click.echo("")
    click.echo(f"done in {time.monotonic() - started:.0f}s; the stack keeps running.")
    click.echo(f"Look at a room:     .venv/bin/backflow show {FIRST_PORTAL}  (any portal or room)")
    click.echo("Per-portal state:   .venv/bin/backflow status")
    click.echo("Keep bridging:      .venv/bin/backflow run  (worker and sink, Ctrl-C to stop)")
    click.echo("Stop the stack:     .venv/bin/backflow stack down  (or make stack-down)")
    click.echo(f"Homeserver:         {settings.homeserver.url} ({settings.homeserver.server_name})")

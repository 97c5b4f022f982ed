"""`backflow deadletter list | show | retry`: filters, and a retry after the cause is fixed.

The sink dead-letters a send the homeserver refused; once the operator fixed
that, `retry` re-publishes it and the sink puts it in the room, read back from
Synapse. A second retry re-publishes nothing, and even a record re-published
twice (ledger lost) reaches the room once. Dead letters whose original still
fails, or that hold a line of an export rather than a record, stay.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import orjson

from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.runner import run_sink
from connectors.matrix.store import SinkStore
from tests.connectors.matrix.test_recovery import sink_env
from tests.helpers import read_raw
from tests.sink_helpers import BASE_TS, NET, client_for, create, publish, room_messages, text
from topics import bus
from topics.codec import decode, encode
from topics.deadletter import DeadLetters, Stage
from topics.records import SendMessage
from topics.settings import Settings


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backflow.cli", "deadletter", *args],
        env=sink_env(settings),
        cwd=settings.state_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def report(settings: Settings, stage: Stage, *letters: tuple[str, bytes, str, str]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        reporter = DeadLetters(producer, settings.catalog.dead_letters, stage)
        for reason, original, source, key in letters:
            await reporter.report(reason, original, source=source, key=key)
    finally:
        await producer.stop()


async def room_ids(settings: Settings, portal: str) -> list[str]:
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        room = await store.room(f"{NET}:{portal}")
    finally:
        await store.close()
    assert room is not None
    async with client_for(settings) as client:
        events = await room_messages(client, room)
    return [e["content"][SOURCE_KEY]["id"] for e in events if SOURCE_KEY in e["content"]]


async def sink_once(settings: Settings) -> None:
    await asyncio.wait_for(run_sink(settings, idle_exit=2.0), 120)


async def test_deadletter_list_show_retry(stack: Settings) -> None:
    catalog = stack.catalog
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    portal, other = "dl-room", "dl-held"
    first = text(portal, "m1", "ann", BASE_TS, "first")
    refused = text(portal, "m2", "bob", BASE_TS + 1000, "refused, then fixed")
    await publish(stack, [create(portal, [("ann", "Ann"), ("bob", "Bob")]), SendMessage(first, 1)])
    key = f"{NET}:{portal}"
    await report(
        stack,
        Stage.SINK,
        (
            "MatrixError: M_FORBIDDEN: user not in room",
            encode(SendMessage(refused, 2)),
            f"{catalog.matrix_commands}[0]@2",
            key,
        ),
    )
    held = text(other, "h1", "cy", BASE_TS, "lost to a database outage")
    await report(
        stack,
        Stage.PIPELINE,
        (
            '{"type": "message", "network": ',
            b'{"type": "message", "network": ',
            f"{catalog.history}[1]@7",
            None,
        ),
        ("processing failed: ConnectionError()", encode(held), f"{catalog.history}[2]@9", held.key),
    )
    await report(
        stack, Stage.IMPORT, ("no date at line start", b"garbage line", "chat.txt:12", None)
    )
    await sink_once(stack)
    assert await room_ids(stack, portal) == ["m1"]

    listed = cli(stack, "list")
    assert listed.returncode == 0, listed.stderr
    assert "4 of 4 dead letters match" in listed.stdout
    assert "M_FORBIDDEN" in listed.stdout and "chat.txt:12" in listed.stdout
    for args, count in (
        (["--stage", "sink"], 1),
        (["--reason", "forbidden"], 1),
        (["--source", "chat.txt"], 1),
        (["--portal", key], 1),
        (["--since", "1h"], 4),
        (["--until", "2000-01-01"], 0),
        (["--stage", "pipeline", "--since", "2000-01-01T00:00"], 2),
    ):
        got = cli(stack, "list", *args)
        assert f"{count} of 4 dead letters match" in got.stdout, (args, got.stdout, got.stderr)
    bad = cli(stack, "list", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "cannot read 'yesterday-ish' as a time" in bad.stderr
    lines = [orjson.loads(line) for line in cli(stack, "list", "--json").stdout.splitlines()]
    sink_letter = next(obj for obj in lines if obj["stage"] == "sink")
    shown = cli(stack, "show", sink_letter["id"])
    assert shown.returncode == 0, shown.stderr
    assert "reason:   MatrixError: M_FORBIDDEN: user not in room" in shown.stdout
    assert '"refused, then fixed"' in shown.stdout
    assert cli(stack, "show", "3@999").returncode == 1

    # Without a filter, retry refuses (it would re-publish everything).
    assert cli(stack, "retry").returncode == 2
    dry = cli(stack, "retry", "--since", "1h", "--dry-run")
    assert "4 matched: 1 not retryable, 1 still failing, 2 would retry" in dry.stdout, dry.stdout
    assert len(await read_raw(stack, catalog.matrix_commands)) == 2  # nothing published

    done = cli(stack, "retry", "--since", "1h")
    assert done.returncode == 1  # one still fails: the operator must look
    assert "4 matched: 1 not retryable, 2 republished, 1 still failing" in done.stdout, done.stdout
    assert "fix the file and import it again" in done.stdout
    assert "invalid JSON" in done.stdout
    commands = [decode(v) for _, v in await read_raw(stack, catalog.matrix_commands)]
    assert commands[-1] == SendMessage(refused, 2)
    history = [decode(v) for _, v in await read_raw(stack, catalog.history)]
    assert history == [held]

    again = cli(stack, "retry", "--since", "1h")
    assert "2 already retried, 1 not retryable, 1 still failing" in again.stdout, again.stdout
    assert len(await read_raw(stack, catalog.matrix_commands)) == 3
    await sink_once(stack)
    assert await room_ids(stack, portal) == ["m1", "m2"]

    # The ledger lost: the send is re-published, and still reaches the room once.
    db = await asyncpg.connect(stack.database.url)
    try:
        await db.execute("DELETE FROM deadletter_retries")
    finally:
        await db.close()
    assert "republished" in cli(stack, "retry", "--stage", "sink").stdout
    assert len(await read_raw(stack, catalog.matrix_commands)) == 4
    await sink_once(stack)
    assert await room_ids(stack, portal) == ["m1", "m2"]

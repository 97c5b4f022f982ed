"""`backflow replay --mode catchup` on the real stack, rooms read back from Synapse.

The log has a portal's whole history, but only part of it reached the sink
as commands. In production such a gap is commands that expired from
matrix-commands (7 days) while the sink was down, or a hold store lost; the
mock broker has no retention, so the test publishes only part of the
commands. No pipeline runs here: replay works from the log alone
(test_replay_pipeline.py runs it beside a real worker). It sends exactly what the room
never got and is newer than its last bridged message; a second run, before
or after the sink applied the first, sends nothing; --dry-run publishes
nothing; --since/--until and --network/--all select.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace

from backflow.replay import Selection, replay_catchup
from connectors.matrix.runner import run_sink
from tests.backflow.test_deadletter_cli import room_ids
from tests.connectors.matrix.test_recovery import sink_env
from tests.helpers import read_raw
from tests.sink_helpers import BASE_TS, NET, create, publish, text
from topics import bus
from topics.codec import decode
from topics.records import Record, SendMessage
from topics.settings import Settings

GAP, FULL = "rp-gap", "rp-full"


def cli(
    settings: Settings, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = sink_env(settings)
    env["BACKFLOW_KAFKA_MOCK_BROKER"] = str(settings.kafka.mock_broker).lower()
    env.update(extra or {})
    return subprocess.run(
        [sys.executable, "-m", "backflow.cli", "replay", *args],
        env=env,
        cwd=settings.state_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def log(settings: Settings, topic: str, records: list[Record]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        await bus.send_all(producer, topic, records)
    finally:
        await producer.stop()


async def sink_once(settings: Settings) -> None:
    await asyncio.wait_for(run_sink(settings, idle_exit=2.0), 120)


async def commands(settings: Settings) -> list[SendMessage]:
    out = [decode(v) for _, v in await read_raw(settings, settings.catalog.matrix_commands)]
    return [c for c in out if isinstance(c, SendMessage)]


async def test_catchup_fills_the_gap_once(stack: Settings) -> None:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    catalog = stack.catalog
    gap = [
        text(GAP, f"m{i}", "ann" if i % 2 else "bob", BASE_TS + i * 1000, f"msg {i}")
        for i in range(1, 7)
    ]
    gap[5] = replace(gap[5], history=False)  # the newest came live
    full = [text(FULL, f"f{i}", "cy", BASE_TS + i * 1000, f"full {i}") for i in range(1, 3)]
    await log(stack, catalog.history, [*gap[:5], *full])
    await log(stack, catalog.live, [gap[5]])
    # What reached the sink: m1 was lost (older than what the room has, so
    # Matrix can never get it there), m2 and m3 arrived, m4..m6 never did.
    pipeline = [create(GAP, [("ann", "Ann")]), SendMessage(gap[1], 1), SendMessage(gap[2], 2)]
    pipeline += [create(FULL), SendMessage(full[0], 1), SendMessage(full[1], 2)]
    await publish(stack, pipeline)
    await sink_once(stack)
    assert await room_ids(stack, GAP) == ["m2", "m3"]
    before = len(await commands(stack))

    dry = cli(stack, "--portal", f"{NET}:{GAP}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would send 3" in dry.stdout, dry.stdout
    for mid in ("m4", "m5", "m6"):
        assert f"  {mid}  text  from " in dry.stdout
    assert "not sent: 1 before_last_bridged, 2 delivered" in dry.stdout, dry.stdout
    window = cli(stack, "--network", NET, "--until", "2020-09-13T12:26:45", "--dry-run")
    assert window.returncode == 0, window.stderr
    assert f"{NET}:{GAP}" in window.stdout and f"{NET}:{FULL}" in window.stdout
    assert "would send 1" in window.stdout and "  m4  " in window.stdout, window.stdout
    assert "  m5  " not in window.stdout
    assert "2 portal(s)" in window.stdout and "would send 1 message(s)" in window.stdout
    assert len(await commands(stack)) == before  # dry runs publish nothing

    done = cli(stack, "--all")
    assert done.returncode == 0, done.stderr
    assert "published 3 message(s)" in done.stdout, done.stdout
    published = (await commands(stack))[before:]
    assert [(c.message.id, c.seq) for c in published] == [("m4", 0), ("m5", 0), ("m6", 0)]
    assert published[2].message == gap[5]  # as the log has it, live flag and all
    # Again before the sink ran: they are in the command log, not sent twice.
    again = cli(stack, "--portal", f"{NET}:{GAP}")
    assert "published 0 message(s)" in again.stdout and "3 queued" in again.stdout, again.stdout

    await sink_once(stack)
    assert await room_ids(stack, GAP) == ["m2", "m3", "m4", "m5", "m6"]
    assert await room_ids(stack, FULL) == ["f1", "f2"]
    after = cli(stack, "--all")
    assert after.returncode == 0, after.stderr
    assert "published 0 message(s)" in after.stdout, after.stdout
    assert "not sent: 1 before_last_bridged, 5 delivered" in after.stdout, after.stdout
    assert len(await commands(stack)) == before + 3
    await sink_once(stack)
    assert await room_ids(stack, GAP) == ["m2", "m3", "m4", "m5", "m6"]


async def test_selection_errors(stack: Settings) -> None:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    assert cli(stack).returncode == 2  # no selection
    assert cli(stack, "--all", "--network", NET).returncode == 2
    bad = cli(stack, "--all", "--since", "last tuesday")
    assert bad.returncode == 2 and "cannot read 'last tuesday' as a time" in bad.stderr
    missing = cli(stack, "--portal", f"{NET}:nowhere")
    assert missing.returncode == 1
    assert "no room in the sink's store" in missing.stdout, missing.stdout


async def test_time_lookup_falls_back_to_a_scan_on_a_blind_broker(stack: Settings) -> None:
    # As if on Apache Kafka (mock_broker off): replay asks offsets_for_times
    # where to start. The mock answers None to everything; the probe at time 0
    # tells that apart from "nothing that new" and the partition is scanned.
    # (Apache Kafka's real answers are covered by test_replay_plan's
    # start_offsets test: the mock cannot show a seek by time.)
    kafka_like = stack.with_overrides({"kafka.mock_broker": False})
    gap = [text(GAP, f"m{i}", "ann", BASE_TS + i * 1000, f"msg {i}") for i in range(1, 5)]
    await log(stack, stack.catalog.history, gap)
    await publish(stack, [create(GAP), SendMessage(gap[0], 1)])
    await sink_once(stack)
    selection = Selection(portals=(f"{NET}:{GAP}",), since=BASE_TS + 3000)
    result = await replay_catchup(kafka_like, selection, dry_run=True)
    [portal] = result.portals
    assert portal.plan is not None
    assert [m.id for m in portal.plan.send] == ["m3", "m4"]
    assert result.read == 4

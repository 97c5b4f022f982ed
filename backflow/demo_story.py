"""The story `backflow demo` tells, on services that are already running.

Phases, each run until the pipeline and the sink are idle:

1. history imports in several formats; ``max_initial_conversations`` holds the
   least recent portals of each import, the rest get rooms;
2. a later export of a portal that has a room (caught up into it) and a live
   record for a held portal (which releases it);
3. one portal replayed with ``--mode rebuild`` (a fresh room, the old one
   tombstoned).

Then one summary row per portal, its "sent" read back from Synapse. Kept apart
from ``backflow/demo.py`` (stack start-up, printing) so a test can run it on
the test session's services with its own small samples.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from backflow.processes import spawn, stop
from backflow.rebuild import replay_rebuild
from backflow.replay import Selection
from connectors.matrix.store import SinkStore
from connectors.publish import publish_source
from connectors.source import available
from pipeline.status import portal_status
from topics.settings import Settings

Echo = Callable[[str], None]
POLL_S = 2.0
# Idle: nothing moved for this many polls in a row (besides each phase's own goal).
QUIET_POLLS = 2

SINK_COUNTS = """
SELECT r.portal_key, r.network, r.room_id, r.alias,
       (SELECT count(*) FROM sink_messages m
        WHERE m.room_id = r.room_id AND m.portal_key = r.portal_key) AS sent,
       (SELECT count(*) FROM sink_rebuilds b
        WHERE b.portal_key = r.portal_key AND b.finished_at IS NOT NULL) AS rebuilt,
       (SELECT count(*) FROM sink_rebuilds b
        WHERE b.portal_key = r.portal_key AND b.finished_at IS NULL) AS rebuilding
FROM sink_rooms r
"""
INTENTS = "SELECT count(*) FROM sink_intents"


@dataclass(frozen=True, slots=True)
class Sample:
    """One import: a connector (format name) reading a bundled file."""

    connector: str
    path: Path
    options: Mapping[str, str] = field(default_factory=dict)
    live: bool = False  # a live record: published without end-of-history markers


@dataclass(frozen=True, slots=True)
class Story:
    history: tuple[Sample, ...]
    later: tuple[Sample, ...]  # newer history for a portal that has a room by then
    live: tuple[Sample, ...]  # live records for a portal that is held by then
    rebuild: str  # the portal key replayed in rebuild mode
    max_initial_conversations: int = 2


@dataclass(slots=True)
class Row:
    portal: str
    network: str
    room: str  # the room's alias (or id); "-" while held
    held: int  # messages the pipeline still holds
    sent: int  # events in the room, as Synapse reports them
    state: str


@dataclass(slots=True)
class Snapshot:
    status: dict[str, dict]
    rooms: dict[str, dict]
    intents: int

    def moved(self) -> tuple:
        return (
            sorted((k, s["state"], s["held"], s["released"]) for k, s in self.status.items()),
            sorted((k, r["sent"], r["room_id"], r["rebuilt"]) for k, r in self.rooms.items()),
            self.intents,
        )

    def settled(self, keys: set[str]) -> bool:
        """Every portal seen, none between states, nothing left to produce or send."""
        for key in keys:
            s = self.status.get(key)
            if s is None or s["state"] not in ("held", "live") or s["pending"]:
                return False
            if s["state"] == "live" and self.rooms.get(key, {}).get("rebuilding"):
                return False
        return self.intents == 0


async def snapshot(settings: Settings) -> Snapshot:
    status = {row["portal"]: row for row in await portal_status(settings)}
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        rooms = {r["portal_key"]: dict(r) for r in await store.pool.fetch(SINK_COUNTS)}
        intents = await store.pool.fetchval(INTENTS)
    finally:
        await store.close()
    return Snapshot(status, rooms, intents)


def progress_line(snap: Snapshot, keys: set[str]) -> str:
    states: dict[str, int] = {}
    for key in sorted(keys):
        state = snap.status.get(key, {}).get("state", "not seen yet")
        states[state] = states.get(state, 0) + 1
    sent = sum(snap.rooms.get(k, {}).get("sent", 0) for k in keys)
    parts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    rebuilds = [snap.rooms.get(k, {}) for k in keys]
    rebuilding = sum(1 for r in rebuilds if r.get("rebuilding"))
    rebuilt = sum(1 for r in rebuilds if r.get("rebuilt"))
    extra = f" | rebuilds: {rebuilding} running, {rebuilt} done" if rebuilding or rebuilt else ""
    return f"  {len(keys)} portals: {parts} | {sent} messages sent{extra}"


async def wait_idle(
    settings: Settings,
    keys: set[str],
    goal: Callable[[Snapshot], bool],
    children: list[Popen],
    echo: Echo,
    deadline: float,
) -> Snapshot:
    """Poll until ``goal`` holds and nothing moved for QUIET_POLLS polls."""
    quiet, last, shown = 0, None, None
    while True:
        snap = await snapshot(settings)
        line = progress_line(snap, keys)
        if line != shown:
            echo(line)
            shown = line
        moved = snap.moved()
        quiet = quiet + 1 if moved == last else 0
        last = moved
        if goal(snap) and snap.settled(keys) and quiet >= QUIET_POLLS:
            return snap
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"`backflow {child.args[-1]}` exited with {child.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the pipeline and the sink were not idle in time")
        await asyncio.sleep(POLL_S)


async def publish(settings: Settings, sample: Sample, echo: Echo) -> set[str]:
    """Import one sample the way `backflow import` does; the portal keys it touched."""
    source = available()[sample.connector](sample.path, dict(sample.options))
    summary = await publish_source(source, settings, complete=not sample.live)
    for line in summary.lines():
        if not line.endswith(": 0"):  # per-source counters that stayed zero say nothing
            echo(f"  {line}")
    return {f"{network}:{portal}" for network, portal in summary.counts}


async def run_story(
    settings: Settings,
    story: Story,
    child_env: dict[str, str],
    echo: Echo,
    logs: Path,
    timeout_s: float = 240,
) -> list[Row]:
    """Run the three phases with a worker and a sink as children; the summary rows."""
    deadline = time.monotonic() + timeout_s
    n = story.max_initial_conversations
    keys: set[str] = set()
    echo(f"importing history (each import gives rooms to its {n} most recent portals) ...")
    for sample in story.history:
        keys |= await publish(settings, sample, echo)
    env = dict(child_env, BACKFLOW_BACKFILL_MAX_INITIAL_CONVERSATIONS=str(n))
    echo(f"running a pipeline worker and the sink until idle (logs in {logs}) ...")
    children = [spawn("worker", logs, env), spawn("sink", logs, env)]
    try:
        first = await wait_idle(settings, keys, lambda s: True, children, echo, deadline)
        held = {k for k in keys if first.status[k]["state"] == "held"}
        echo(f"held by max_initial_conversations={n}: {', '.join(sorted(held)) or 'none'}")

        echo("a later export of a portal with a room, and a live message for a held one ...")
        later: set[str] = set()
        for sample in story.later:
            later |= await publish(settings, sample, echo)
        released: set[str] = set()
        for sample in story.live:
            released |= await publish(settings, sample, echo)
        keys |= later | released
        before = {k: first.rooms.get(k, {}).get("sent", 0) for k in later}

        def caught_up(s: Snapshot) -> bool:
            grown = all(s.rooms.get(k, {}).get("sent", 0) > before[k] for k in later)
            return grown and all(s.status[k]["state"] == "live" for k in released)

        await wait_idle(settings, keys, caught_up, children, echo, deadline)

        echo(f"replaying {story.rebuild} in rebuild mode (fresh room, old one tombstoned) ...")
        result = await replay_rebuild(settings, Selection(portals=(story.rebuild,)))
        for p in result.portals:
            echo(f"  {p.key}: {len(p.plan.send)} messages into a new room, {', '.join(p.steps)}")

        def rebuilt(s: Snapshot) -> bool:
            return s.rooms.get(story.rebuild, {}).get("rebuilt", 0) > 0

        final = await wait_idle(settings, keys, rebuilt, children, echo, deadline)
    finally:
        stop(children)
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        for r in await store.rebuilds(story.rebuild):
            echo(f"  {story.rebuild}: old room {r['old_room']} tombstoned, now {r['new_room']}")
    finally:
        await store.close()
    return await summary_rows(settings, final, keys)


async def summary_rows(settings: Settings, snap: Snapshot, keys: set[str]) -> list[Row]:
    from backflow.cli.sink import timeline_lines

    rows = []
    for key in sorted(keys):
        status, room = snap.status.get(key, {}), snap.rooms.get(key)
        sent = len(await timeline_lines(settings, key)) if room else 0
        state = status.get("state", "?") + (" (rebuilt)" if room and room["rebuilt"] else "")
        rows.append(
            Row(
                portal=key,
                network=key.partition(":")[0],
                room=(room["alias"] or room["room_id"]) if room else "-",
                held=status.get("held", 0),
                sent=sent,
                state=state,
            )
        )
    return rows


def table(rows: list[Row]) -> list[str]:
    """The summary as aligned text lines."""
    head = ("portal", "network", "room", "held", "sent", "state")
    cells = [head] + [
        (r.portal, r.network, r.room, str(r.held), str(r.sent), r.state) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]

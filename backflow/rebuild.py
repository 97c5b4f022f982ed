"""`backflow replay --mode rebuild`: build a portal again in a fresh room from the log.

What is published, per selected portal, to the sink's command topic (the
portal's partition keeps it in order):

1. ``CreateRoom(rebuild=NAME)``: the sink creates a fresh room, which
   becomes the portal's room (connectors/matrix/rooms.py, ``sink_rebuilds``);
2. ``SendMessage(seq=0)`` for the portal's full history as the log has it,
   capped as a new room (``backflow.replay_plan.plan_rebuild``);
3. ``CreateRoom(finish_rebuild=NAME)``: ``m.room.tombstone`` in the old room
   pointing at the new one, the portal's alias moved there.

Resuming: a rebuild whose finish is neither applied (``sink_rebuilds``) nor
in the command log is unfinished, and the next `replay --mode rebuild` of
the portal continues it under the same name instead of starting another: it
publishes only the steps and messages that are neither in the new room (the
message map) nor already in the command log after its start.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from backflow.replay import (
    MAX_CANDIDATES,
    ReplayError,
    ReplayResult,
    Selection,
    look_up,
    open_store,
    read_log,
    select,
)
from backflow.replay_plan import CatchupPlan, part_key, plan_rebuild
from connectors.matrix.store import SinkStore
from topics import bus
from topics.codec import RecordError, decode, encode
from topics.records import CreateRoom, NetworkMessage, PortalInfo, SendMessage
from topics.settings import Settings


@dataclass
class CommandLog:
    """One portal's rebuild commands found in the command log."""

    started: list[str] = field(default_factory=list)  # names, in log order
    finished: set[str] = field(default_factory=set)
    sends: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # after each start


@dataclass
class PortalRebuild:
    key: str
    network: str
    portal: str
    old_room: str
    name: str
    resumed: bool = False
    new_room: str | None = None
    finished: bool = False
    last_bridged_ts: int | None = None  # of the new room
    info: PortalInfo | None = None
    messages: list[NetworkMessage] = field(default_factory=list)
    delivered: set[tuple[str, int]] = field(default_factory=set)  # in the new room
    start_logged: bool = False
    finish_logged: bool = False
    queued: set[tuple[str, int]] = field(default_factory=set)
    plan: CatchupPlan | None = None
    steps: list[str] = field(default_factory=list)  # what is (or would be) published

    @property
    def need_start(self) -> bool:
        return not self.start_logged and self.new_room is None

    @property
    def need_finish(self) -> bool:
        return not self.finish_logged and not self.finished


@dataclass
class RebuildResult:
    portals: list[PortalRebuild] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    read: int = 0
    unreadable: int = 0


async def replay_rebuild(
    settings: Settings, selection: Selection, dry_run: bool = False
) -> RebuildResult:
    """Plan (and unless ``dry_run`` publish) the rebuild of every selected portal."""
    store = await open_store(settings)
    result = RebuildResult()
    try:
        found = ReplayResult()
        current = await select(store, selection, found)
        result.missing = found.missing
        if not current:
            return result
        logged = await _command_log(settings, set(current))
        portals: dict[str, PortalRebuild] = {}
        for key, p in current.items():
            portals[key] = await _resume_or_start(store, key, p.room_id, logged.get(key))
        await _read_history(settings, selection, portals, result)
        for p in portals.values():
            if p.new_room is not None:
                p.last_bridged_ts = await store.last_bridged_ts(p.new_room, p.key)
                p.delivered = await look_up(store, p.new_room, p.key, p.messages)
    finally:
        await store.close()
    for p in portals.values():
        p.plan = plan_rebuild(
            p.messages,
            delivered=p.delivered,
            last_bridged_ts=p.last_bridged_ts,
            backfill=settings.backfill,
            queued=p.queued,
        )
        p.steps = (["create the new room"] if p.need_start else []) + (
            ["tombstone the old room, move the alias"] if p.need_finish else []
        )
    if not dry_run:
        await _publish(settings, portals.values())
    result.portals = sorted(portals.values(), key=lambda p: p.key)
    return result


async def _command_log(settings: Settings, keys: set[str]) -> dict[str, CommandLog]:
    out: dict[str, CommandLog] = {}
    async for key, value in read_log(settings, [settings.catalog.matrix_commands], keys, None):
        try:
            command = decode(value)
        except RecordError:
            continue
        log = out.setdefault(key, CommandLog())
        if isinstance(command, CreateRoom):
            if command.rebuild is not None and command.rebuild not in log.started:
                log.started.append(command.rebuild)
                log.sends[command.rebuild] = set()
            if command.finish_rebuild is not None:
                log.finished.add(command.finish_rebuild)
        elif isinstance(command, SendMessage):
            # A send counts for every rebuild started before it and not finished.
            for name in log.started:
                if name not in log.finished:
                    log.sends[name].add(part_key(command.message))
    return out


async def _resume_or_start(
    store: SinkStore, key: str, room_id: str, logged: CommandLog | None
) -> PortalRebuild:
    network, _, portal = key.partition(":")
    logged = logged or CommandLog()
    rows = await store.rebuilds(key)
    done = {r["name"] for r in rows if r["finished_at"] is not None}
    for row in reversed(rows):
        if row["finished_at"] is None and row["name"] not in logged.finished:
            p = PortalRebuild(key, network, portal, row["old_room"], row["name"], resumed=True)
            p.new_room = row["new_room"]
            break
    else:
        pending = [n for n in logged.started if n not in logged.finished and n not in done]
        if pending:  # started in the log, not applied by the sink yet
            p = PortalRebuild(key, network, portal, room_id, pending[-1], resumed=True)
        else:
            p = PortalRebuild(key, network, portal, room_id, secrets.token_hex(6))
    p.start_logged = p.name in logged.started
    p.finish_logged = p.name in logged.finished
    p.queued = logged.sends.get(p.name, set())
    return p


async def _read_history(
    settings: Settings,
    selection: Selection,
    portals: dict[str, PortalRebuild],
    result: RebuildResult,
) -> None:
    catalog = settings.catalog
    kept = 0
    topics = [catalog.history, catalog.live]
    async for _, value in read_log(settings, topics, set(portals), None):
        result.read += 1
        try:
            record = decode(value)
        except RecordError:
            result.unreadable += 1
            continue
        p = portals.get(getattr(record, "key", ""))
        if p is None:
            continue
        if isinstance(record, PortalInfo):
            p.info = record  # the newest wins, as in the pipeline
        elif isinstance(record, NetworkMessage) and selection.in_window(record.ts):
            kept += 1
            if kept > MAX_CANDIDATES:
                raise ReplayError(
                    f"more than {MAX_CANDIDATES} messages to rebuild in one run: "
                    "rebuild fewer portals at a time (--portal)"
                )
            p.messages.append(record)


def _create(p: PortalRebuild, **step: str) -> CreateRoom:
    info = p.info
    return CreateRoom(
        network=p.network,
        portal=p.portal,
        name=info.name if info else None,
        topic=info.topic if info else None,
        members=info.members if info else (),
        avatar_url=info.avatar_url if info else None,
        **step,
    )


async def _publish(settings: Settings, portals: Iterable[PortalRebuild]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    topic = settings.catalog.matrix_commands
    try:
        for p in portals:
            assert p.plan is not None
            records: list[CreateRoom | SendMessage] = []
            if p.need_start:
                records.append(_create(p, rebuild=p.name))
            records += [SendMessage(message=m, seq=0) for m in p.plan.send]
            if p.need_finish:
                records.append(_create(p, finish_rebuild=p.name))
            futures = [await producer.send(topic, encode(r), key=p.key.encode()) for r in records]
            for f in futures:
                await f
    finally:
        await producer.stop()

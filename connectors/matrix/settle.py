"""Settling in-doubt sends: did a send we cannot vouch for land in the room?

A send is in doubt when a crash left its intent in the store, or when it
failed without an answer. Repeating its txn id is not enough (Synapse forgets
txn ids when it restarts), so we look in the room: sends in a room are
sequential, so anything in doubt is newer than the newest event we recorded;
scanning back to it finds our ``fi.backflow.source`` marker if it landed.
"""

from __future__ import annotations

import logging

from connectors.matrix.client import MatrixClient
from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.queues import RoomState
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import SinkStore
from topics.logs import fields
from topics.records import portal_key

log = logging.getLogger("backflow.sink")

SCAN_PAGES = 50  # settling looks at most this many /messages pages back

Found = dict[tuple[str, int], tuple[str, int, str]]  # (message id, part) -> (event, ts, sender)


async def scan(client: MatrixClient, room_id: str, key: str, stop_event: str | None) -> Found:
    """Our events for portal ``key`` newer than ``stop_event``."""
    found: Found = {}
    seen: dict[str, tuple[int, str]] = {}  # event id -> (ts, sender), redacted ones too
    redactions: list[tuple[str, str]] = []  # (target message id, redacted event id)
    token: str | None = None
    for _ in range(SCAN_PAGES):
        page = await client.messages(room_id, direction="b", start=token, limit=100)
        chunk = page.get("chunk") or []
        done = not chunk or not page.get("end")
        for ev in chunk:
            if (stop_event is not None and ev.get("event_id") == stop_event) or ev.get(
                "type"
            ) == "m.room.create":
                done = True
                break
            seen[ev["event_id"]] = (ev["origin_server_ts"], ev["sender"])
            content = ev.get("content") or {}
            src = content.get(SOURCE_KEY)
            if not isinstance(src, dict):
                continue
            if portal_key(str(src.get("network")), str(src.get("portal"))) != key:
                continue
            item = (str(src.get("id")), int(src.get("part") or 0))
            found.setdefault(item, (ev["event_id"], ev["origin_server_ts"], ev["sender"]))
            # A redacted target has lost its marker; its redaction names it.
            if ev.get("type") == "m.room.redaction" and src.get("target"):
                redacts = content.get("redacts") or ev.get("redacts")
                if redacts:
                    redactions.append((str(src["target"]), redacts))
        if done:
            break
        token = page.get("end")
    for target, event_id in redactions:
        if event_id in seen:  # only targets inside the scanned (in-doubt) range
            ts, sender = seen[event_id]
            found.setdefault((target, 0), (event_id, ts, sender))
    return found


async def settle_startup(
    client: MatrixClient, store: SinkStore, stats: SinkStats, key: str, room: RoomState
) -> None:
    """Settle intents left by a previous run for this room (once per process)."""
    if room.settled_startup:
        return
    intents = [i for i in await store.intents(room.room_id) if i.portal_key == key]
    room.settled_startup = True
    if not intents:
        return
    found = await scan(client, room.room_id, key, await store.newest_event(room.room_id))
    results = []
    for intent in intents:
        hit = found.get((intent.message_id, intent.part))
        if hit is not None:
            results.append((intent, hit[0], hit[1], hit[2]))
    if results:
        # Order by ts so the newest recorded event is the newest in the room.
        results.sort(key=lambda r: r[2])
        await store.record(results)
        stats.settled += len(results)
        room.last_event = await store.newest_event(room.room_id)
        log.info(
            "portal %s: settled %d in-doubt sends from a previous run",
            key,
            len(results),
            extra=fields(key),
        )

"""Walking one batch of records through its portals' state: pure, no I/O.

The hold store (pipeline.hold) locks the portal rows a batch touches and hands
them to ``walk`` together with the records in partition order. ``walk`` does
what processing them one by one would do to each portal (arrival numbers,
room requests, the state a release or a live message leads to, watermarks)
and returns what the store must then do in bulk: one insert for all message
rows, and per portal the ordered list of releases and live forwards that need
the database (held rows, target lookups) to be planned. A batch touches
dozens of portals; doing their work statement by statement cost ~0.3 ms a
round trip, which is what bounded the pipeline.

Records of different portals never affect each other here, so only each
portal's own order matters: a release sees the rows that arrived before it
(``upto``), a live message after a ``room_created`` is forwarded after that
release.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.intake import Incoming
from pipeline.portal import (
    ROOM_STATES,
    Forward,
    Held,
    Portal,
    Release,
    after_release,
    request_room,
)
from topics.codec import encode
from topics.records import (
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    RoomCreated,
    SyncComplete,
)
from topics.settings import BackfillSettings


@dataclass(slots=True)
class Walked:
    """What the store does for a batch after ``walk``."""

    # pipeline_message columns, one entry per message part (in batch order).
    keys: list[str] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)
    lives: list[bool] = field(default_factory=list)
    items: list[Incoming] = field(default_factory=list)
    actions: dict[str, list[Release | Forward]] = field(default_factory=dict)
    syncs: list[SyncComplete] = field(default_factory=list)
    # (network, sync) pairs to re-check for max_initial_conversations after commit.
    decide: set[tuple[str, str]] = field(default_factory=set)


def walk(
    batch: Sequence[Incoming], portals: dict[str, Portal], backfill: BackfillSettings
) -> Walked:
    """Advance ``portals`` through ``batch`` (in partition order); what is left to do."""
    out = Walked()
    for item in batch:
        rec = item.record
        if isinstance(rec, NetworkMessage):
            _message(out, item, rec, portals[rec.key])
        elif isinstance(rec, SyncComplete):
            out.syncs.append(rec)
            out.decide.add((rec.network, rec.sync))
        elif isinstance(rec, PortalInfo):
            portal = portals[rec.key]
            portal.info = item.raw or encode(rec)
            # The network's own last-activity time ranks the portal too (mautrix
            # ranks WhatsApp chats by the conversation's last message time).
            last = rec.last_activity_ts
            if last is not None and (portal.newest_ts is None or last > portal.newest_ts):
                portal.newest_ts = last
        elif isinstance(rec, HistoryComplete):
            portal = portals[rec.key]
            portal.history_complete = True
            if rec.sync is not None:
                portal.sync = rec.sync
            if portal.state in ROOM_STATES:
                # History for a portal whose room exists: catch-up.
                _release(out, portal, catch_up=True, last_ts=None, portal_ts=True)
            elif portal.room_requested:
                pass
            elif backfill.max_initial_conversations < 0 or rec.sync is None:
                request_room(portal)
            else:
                out.decide.add((rec.network, rec.sync))
        elif isinstance(rec, RoomCreated):
            portal = portals[rec.key]
            if portal.room_id == rec.room_id and portal.state in ROOM_STATES:
                continue  # redelivered: the release already happened
            portal.room_id, portal.alias = rec.room_id, rec.alias
            portal.room_requested = portal.room_created = True
            _release(
                out,
                portal,
                catch_up=rec.last_bridged_ts is not None,
                last_ts=rec.last_bridged_ts,
                portal_ts=False,
                room=rec,
            )
    return out


def _message(out: Walked, item: Incoming, m: NetworkMessage, portal: Portal) -> None:
    arrival = portal.next_arrival
    portal.next_arrival += 1  # a duplicate that is not inserted leaves a gap: harmless
    live = item.kind == "live" or not m.history
    out.keys.append(portal.key)
    out.arrivals.append(arrival)
    out.lives.append(live)
    out.items.append(item)
    if portal.newest_ts is None or m.ts > portal.newest_ts:
        portal.newest_ts = m.ts
    if not live:
        portal.held_history += 1  # waits for HistoryComplete (release or catch-up)
        return
    if portal.state in ROOM_STATES:
        held = Held(
            id=m.id,
            part=m.part,
            ts=m.ts,
            ord=item.offset,
            live=True,
            kind=m.content.kind,
            target=m.content.target,
            arrival=arrival,
        )
        actions = out.actions.setdefault(portal.key, [])
        if actions and isinstance(actions[-1], Forward):
            actions[-1].msgs.append(held)
        else:
            actions.append(
                Forward(
                    msgs=[held],
                    history_decided=portal.history_decided,
                    live_decided=portal.live_decided,
                )
            )
        # Forwarded now; history follows along only while none is held, so a
        # later release scans only what it needs.
        portal.live_decided = arrival
        if portal.held_history == 0:
            portal.history_decided = arrival
    elif not portal.room_requested:
        request_room(portal)  # a live message always asks for the room


def _release(
    out: Walked,
    portal: Portal,
    *,
    catch_up: bool,
    last_ts: int | None,
    portal_ts: bool,
    room: RoomCreated | None = None,
) -> None:
    upto = portal.next_arrival - 1
    out.actions.setdefault(portal.key, []).append(
        Release(
            upto=upto,
            history_decided=portal.history_decided,
            live_decided=portal.live_decided,
            catch_up=catch_up,
            last_ts=last_ts,
            portal_ts=portal_ts,
            room=room,
        )
    )
    # A release decides every row held so far.
    portal.history_decided = portal.live_decided = upto
    portal.held_history = 0
    portal.state = after_release(portal.state)


"""Durable pipeline state in Postgres: portals, the hold store, the command outbox.

Why Postgres and not faust tables (or memory):
- a portal's backlog is never one in-memory value: every held message is its
  own row, so a worker holding millions of messages stays at constant memory;
- in-order release is an index scan over (portal, ts, live, ord), read in
  batches, instead of deserialising and re-sorting a whole backlog;
- the ``max_initial_conversations`` ranking needs every portal of a sync at
  once, and those live on other partitions/workers: Postgres is the shared view;
- the outbox (commands with their per-portal ``seq``) is written in the same
  transaction that marks messages released, so a crash can never separate them.

Rows are keyed so that redelivered records are no-ops: (portal, message id,
part) for messages, (portal, seq) for commands, the portal key for portals.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import asyncpg
import orjson

from backflow.settings import BackfillSettings
from pipeline import policy
from topics.codec import decode, encode
from topics.records import (
    Content,
    CreateRoom,
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    RoomCreated,
    Sender,
    SyncComplete,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_portal (
    key text PRIMARY KEY,
    network text NOT NULL,
    portal text NOT NULL,
    partition int,
    state text NOT NULL DEFAULT 'held',
    info bytea,
    sync text,
    history_complete boolean NOT NULL DEFAULT false,
    room_requested boolean NOT NULL DEFAULT false,
    create_room_produced boolean NOT NULL DEFAULT false,
    room_id text,
    alias text,
    newest_ts bigint,
    last_bridged_ts bigint,
    last_bridged_id text,
    next_seq bigint NOT NULL DEFAULT 1,
    dropped jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pipeline_portal_sync ON pipeline_portal (network, sync);
CREATE INDEX IF NOT EXISTS pipeline_portal_backfilling ON pipeline_portal (partition)
    WHERE state = 'backfilling';
CREATE INDEX IF NOT EXISTS pipeline_portal_create_pending ON pipeline_portal (partition)
    WHERE room_requested AND NOT create_room_produced;

CREATE TABLE IF NOT EXISTS pipeline_message (
    portal_key text NOT NULL,
    msg_id text NOT NULL,
    part int NOT NULL,
    ts bigint NOT NULL,
    ord bigint NOT NULL,
    live boolean NOT NULL,
    kind text NOT NULL,
    target text,
    record bytea NOT NULL,
    state text NOT NULL DEFAULT 'held',
    reason text,
    seq bigint,
    produced boolean NOT NULL DEFAULT false,
    PRIMARY KEY (portal_key, msg_id, part)
);
CREATE INDEX IF NOT EXISTS pipeline_message_release
    ON pipeline_message (portal_key, ts, live, ord) WHERE state = 'held';
CREATE UNIQUE INDEX IF NOT EXISTS pipeline_message_seq
    ON pipeline_message (portal_key, seq) WHERE seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS pipeline_message_outbox
    ON pipeline_message (portal_key, seq) WHERE seq IS NOT NULL AND NOT produced;

CREATE TABLE IF NOT EXISTS pipeline_sync (
    network text NOT NULL,
    sync text NOT NULL,
    portals int NOT NULL,
    decided boolean NOT NULL DEFAULT false,
    PRIMARY KEY (network, sync)
);

CREATE TABLE IF NOT EXISTS pipeline_command_offset (
    partition int PRIMARY KEY,
    next_offset bigint NOT NULL
);
"""

# Portal states (what `backflow status` shows).
HELD = "held"  # no room requested yet
WAITING = "waiting_for_room"  # CreateRoom requested, RoomCreated not seen
BACKFILLING = "backfilling"  # released commands not all produced yet
LIVE = "live"  # room exists, everything produced; new messages are forwarded

_ROOM_STATES = (BACKFILLING, LIVE)


async def init_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        # Several workers may start at once: serialise the DDL.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7460001)")
            await conn.execute(SCHEMA)


@dataclass(slots=True)
class Incoming:
    """One decoded record with where it came from."""

    record: object
    topic: str  # "history", "live" or "events"
    partition: int
    offset: int
    raw: bytes = b""  # the original bytes, for a dead letter if processing fails


@dataclass(slots=True)
class Portal:
    key: str
    state: str
    room_requested: bool
    room_id: str | None
    next_seq: int
    last_bridged_ts: int | None
    last_bridged_id: str | None


@dataclass(slots=True)
class Outcome:
    """What a batch changed that needs follow-up outside its transaction."""

    syncs: set[tuple[str, str]] = field(default_factory=set)
    errors: list[tuple[Incoming, str]] = field(default_factory=list)


def _portal_of(record: object) -> tuple[str, str] | None:
    if isinstance(record, NetworkMessage | PortalInfo | HistoryComplete | RoomCreated):
        return record.network, record.portal
    return None


class Store:
    """All reads and writes of the pipeline, one transaction per call."""

    def __init__(self, pool: asyncpg.Pool, backfill: BackfillSettings) -> None:
        self.pool = pool
        self.backfill = backfill

    # ------------------------------------------------------------ batches

    async def apply(self, batch: Sequence[Incoming]) -> Outcome:
        """Apply a batch of records (in partition order) in one transaction."""
        outcome = Outcome()
        async with self.pool.acquire() as conn, conn.transaction():
            portals = await self._lock_portals(conn, batch)
            run: list[Incoming] = []
            for item in batch:
                if isinstance(item.record, NetworkMessage):
                    run.append(item)
                    continue
                if run:
                    await self._messages(conn, run, portals)
                    run = []
                await self._control(conn, item, portals, outcome)
            if run:
                await self._messages(conn, run, portals)
        return outcome

    async def apply_one(self, item: Incoming) -> Outcome:
        """Fallback when a batch failed: one record, so a bad one is isolated."""
        return await self.apply([item])

    async def _lock_portals(
        self, conn: asyncpg.Connection, batch: Sequence[Incoming]
    ) -> dict[str, Portal]:
        seen: dict[str, tuple[str, str, int]] = {}
        for item in batch:
            ident = _portal_of(item.record)
            if ident is not None:
                key = f"{ident[0]}:{ident[1]}"
                if key not in seen:
                    seen[key] = (ident[0], ident[1], item.partition)
        if not seen:
            return {}
        keys = sorted(seen)
        await conn.execute(
            """
            INSERT INTO pipeline_portal (key, network, portal, partition)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[])
            ON CONFLICT (key) DO NOTHING
            """,
            keys,
            [seen[k][0] for k in keys],
            [seen[k][1] for k in keys],
            [seen[k][2] for k in keys],
        )
        # Row locks in key order: a portal's events seen on an unexpected
        # partition (another worker) serialise here instead of racing on seq.
        rows = await conn.fetch(
            """
            SELECT key, state, room_requested, room_id, next_seq, last_bridged_ts,
                   last_bridged_id
            FROM pipeline_portal WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
            """,
            keys,
        )
        return {r["key"]: Portal(**dict(r)) for r in rows}

    # ------------------------------------------------------------ messages

    async def _messages(
        self, conn: asyncpg.Connection, run: list[Incoming], portals: dict[str, Portal]
    ) -> None:
        cols: tuple[list, ...] = ([], [], [], [], [], [], [], [], [])
        for item in run:
            m = item.record
            assert isinstance(m, NetworkMessage)
            live = item.topic == "live" or not m.history
            for col, value in zip(
                cols,
                (
                    m.key,
                    m.id,
                    m.part,
                    m.ts,
                    item.offset,
                    live,
                    m.content.kind,
                    m.content.target,
                    encode_message(m),
                ),
                strict=True,
            ):
                col.append(value)
        # One round trip: insert, raise the portals' newest_ts from the rows
        # actually inserted, and return only the new live rows (history waits
        # for HistoryComplete, so nothing else needs the inserted rows).
        inserted = await conn.fetch(
            """
            WITH ins AS (
                INSERT INTO pipeline_message
                    (portal_key, msg_id, part, ts, ord, live, kind, target, record)
                SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[],
                                     $5::bigint[], $6::bool[], $7::text[], $8::text[],
                                     $9::bytea[])
                ON CONFLICT DO NOTHING
                RETURNING portal_key, msg_id, part, ts, ord, live, kind, target
            ), newest AS (
                UPDATE pipeline_portal p SET newest_ts = greatest(p.newest_ts, n.ts),
                       updated_at = now()
                FROM (SELECT portal_key, max(ts) AS ts FROM ins GROUP BY portal_key) n
                WHERE p.key = n.portal_key
            )
            SELECT * FROM ins WHERE live
            """,
            *cols,
        )
        if not inserted:
            return
        # Live messages: forward at once into an existing room, or request
        # the room (a live message always does, whatever the sync ranking).
        forward: dict[str, list[policy.Held]] = {}
        for r in sorted(inserted, key=lambda r: (r["live"], r["ord"])):
            if not r["live"]:
                continue  # history waits for HistoryComplete (release or catch-up)
            portal = portals[r["portal_key"]]
            if portal.state in _ROOM_STATES:
                forward.setdefault(portal.key, []).append(_held(r))
            elif not portal.room_requested:
                await self._request_room(conn, portal)
        for key, msgs in forward.items():
            await self._forward_live(conn, portals[key], msgs)

    async def _forward_live(
        self, conn: asyncpg.Connection, portal: Portal, msgs: list[policy.Held]
    ) -> None:
        targets = [m.target for m in msgs if m.dependent]
        sent: set[str] = set()
        held: set[str] = set()
        if targets:
            for r in await conn.fetch(
                """
                SELECT msg_id, state, reason FROM pipeline_message
                WHERE portal_key = $1 AND msg_id = ANY($2::text[])
                """,
                portal.key,
                targets,
            ):
                if r["state"] == "released" or r["reason"] == policy.BEFORE_LAST_BRIDGED:
                    sent.add(r["msg_id"])
                elif r["state"] == "held":
                    held.add(r["msg_id"])
        release: list[policy.Held] = []
        dropped: list[tuple[policy.Held, str]] = []
        for m in msgs:
            decision = policy.live_decision(m, sent=sent, held=held)
            if decision is None:
                release.append(m)
                sent.add(m.id)
            elif decision != "hold":
                dropped.append((m, decision))
        await self._write_plan(conn, portal, release, dropped)

    # ------------------------------------------------------------ control records

    async def _control(
        self,
        conn: asyncpg.Connection,
        item: Incoming,
        portals: dict[str, Portal],
        outcome: Outcome,
    ) -> None:
        rec = item.record
        if isinstance(rec, SyncComplete):
            await conn.execute(
                """
                INSERT INTO pipeline_sync (network, sync, portals) VALUES ($1, $2, $3)
                ON CONFLICT (network, sync) DO UPDATE SET portals = EXCLUDED.portals
                """,
                rec.network,
                rec.sync,
                rec.portals,
            )
            outcome.syncs.add((rec.network, rec.sync))
            return
        assert isinstance(rec, PortalInfo | HistoryComplete | RoomCreated)
        portal = portals[rec.key]
        if isinstance(rec, PortalInfo):
            await conn.execute(
                "UPDATE pipeline_portal SET info = $2, updated_at = now() WHERE key = $1",
                portal.key,
                encode(rec),
            )
        elif isinstance(rec, HistoryComplete):
            await conn.execute(
                """
                UPDATE pipeline_portal SET history_complete = true,
                       sync = coalesce($2, sync), updated_at = now()
                WHERE key = $1
                """,
                portal.key,
                rec.sync,
            )
            if portal.state in _ROOM_STATES:
                # History for a portal whose room exists: catch-up.
                await self._release(conn, portal, catch_up=True, last_ts=portal.last_bridged_ts)
            elif portal.room_requested:
                pass
            elif self.backfill.max_initial_conversations < 0 or rec.sync is None:
                await self._request_room(conn, portal)
            else:
                outcome.syncs.add((rec.network, rec.sync))
        elif isinstance(rec, RoomCreated):
            if portal.room_id == rec.room_id and portal.state in _ROOM_STATES:
                return  # redelivered: the release already happened
            await conn.execute(
                """
                UPDATE pipeline_portal SET room_id = $2, alias = $3, room_requested = true,
                       create_room_produced = true, updated_at = now()
                WHERE key = $1
                """,
                portal.key,
                rec.room_id,
                rec.alias,
            )
            portal.room_id, portal.room_requested = rec.room_id, True
            catch_up = rec.last_bridged_ts is not None
            await self._release(conn, portal, catch_up=catch_up, last_ts=rec.last_bridged_ts)

    async def _request_room(self, conn: asyncpg.Connection, portal: Portal) -> None:
        """Idempotent: the flag is the request; the outbox flush produces CreateRoom."""
        await conn.execute(
            """
            UPDATE pipeline_portal SET room_requested = true, updated_at = now(),
                   state = CASE WHEN state = 'held' THEN 'waiting_for_room' ELSE state END
            WHERE key = $1
            """,
            portal.key,
        )
        portal.room_requested = True
        if portal.state == HELD:
            portal.state = WAITING

    # ------------------------------------------------------------ release

    async def _release(
        self, conn: asyncpg.Connection, portal: Portal, *, catch_up: bool, last_ts: int | None
    ) -> None:
        """Plan and record the release of everything held (commands go to the outbox)."""
        rows = await conn.fetch(
            """
            SELECT msg_id, part, ts, ord, live, kind, target FROM pipeline_message
            WHERE portal_key = $1 AND state = 'held' ORDER BY ts, live, ord
            """,
            portal.key,
        )
        held = [_held(r) for r in rows]
        lookup = {m.target for m in held if m.dependent}
        if last_ts is not None:
            lookup |= {m.id for m in held if m.ts == last_ts}
        bridged: set[str] = set()
        if lookup:
            bridged = {
                r["msg_id"]
                for r in await conn.fetch(
                    """
                    SELECT DISTINCT msg_id FROM pipeline_message
                    WHERE portal_key = $1 AND msg_id = ANY($2::text[])
                      AND (state = 'released' OR reason = 'before_last_bridged')
                    """,
                    portal.key,
                    list(lookup),
                )
            }
        if portal.last_bridged_id is not None and catch_up:
            bridged.add(portal.last_bridged_id)
        cap = policy.effective_cap(
            catch_up=catch_up,
            max_initial=self.backfill.max_initial_messages,
            max_catchup=self.backfill.max_catchup_messages,
        )
        plan = policy.plan_release(
            held,
            cap=cap,
            last_bridged_ts=last_ts,
            bridged=bridged,
            backfill_enabled=self.backfill.enabled,
        )
        await self._write_plan(conn, portal, plan.release, plan.dropped)

    async def _write_plan(
        self,
        conn: asyncpg.Connection,
        portal: Portal,
        release: list[policy.Held],
        dropped: list[tuple[policy.Held, str]],
    ) -> None:
        """Assign seqs and mark rows released/dropped; all in the caller's transaction."""
        ids: list[str] = []
        parts: list[int] = []
        states: list[str] = []
        seqs: list[int | None] = []
        reasons: list[str | None] = []
        seq = portal.next_seq
        newest: policy.Held | None = None
        for m in release:
            ids.append(m.id)
            parts.append(m.part)
            states.append("released")
            seqs.append(seq)
            reasons.append(None)
            seq += 1
            if newest is None or (m.ts, m.ord) >= (newest.ts, newest.ord):
                newest = m
        counts: dict[str, int] = {}
        for m, reason in dropped:
            ids.append(m.id)
            parts.append(m.part)
            states.append("dropped")
            seqs.append(None)
            reasons.append(reason)
            counts[reason] = counts.get(reason, 0) + 1
        if ids:
            await conn.execute(
                """
                UPDATE pipeline_message m SET state = u.state, seq = u.seq, reason = u.reason
                FROM unnest($2::text[], $3::int[], $4::text[], $5::bigint[], $6::text[])
                     AS u(msg_id, part, state, seq, reason)
                WHERE m.portal_key = $1 AND m.msg_id = u.msg_id AND m.part = u.part
                """,
                portal.key,
                ids,
                parts,
                states,
                seqs,
                reasons,
            )
        # A release into a new room shows BACKFILLING until the flush has the
        # whole outbox in the log; a LIVE portal stays LIVE while forwarding.
        new_state = LIVE if portal.state == LIVE else BACKFILLING
        if (
            release
            and newest is not None
            and (portal.last_bridged_ts is None or newest.ts >= portal.last_bridged_ts)
        ):
            portal.last_bridged_ts, portal.last_bridged_id = newest.ts, newest.id
        await conn.execute(
            """
            UPDATE pipeline_portal SET state = $2, next_seq = $3, last_bridged_ts = $4,
                   last_bridged_id = $5, updated_at = now(),
                   dropped = (SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
                       SELECT k, sum(v::bigint) AS v FROM (
                           SELECT * FROM jsonb_each_text(dropped)
                           UNION ALL SELECT * FROM jsonb_each_text($6::jsonb)) AS a(k, v)
                       GROUP BY k) AS s)
            WHERE key = $1
            """,
            portal.key,
            new_state,
            seq,
            portal.last_bridged_ts,
            portal.last_bridged_id,
            json.dumps(counts),
        )
        portal.state, portal.next_seq = new_state, seq

    # ------------------------------------------------------------ sync ranking

    async def decide_sync(self, network: str, sync: str) -> list[str]:
        """Request rooms for the N most recent portals once a sync is complete.

        Every HistoryComplete and SyncComplete re-checks after its own commit,
        so the last one to commit (on whichever worker) sees everything; the
        ``decided`` flag makes exactly one of them act.
        """
        n = self.backfill.max_initial_conversations
        async with self.pool.acquire() as conn, conn.transaction():
            expected = await conn.fetchval(
                "SELECT portals FROM pipeline_sync WHERE network = $1 AND sync = $2 "
                "AND NOT decided",
                network,
                sync,
            )
            if expected is None:
                return []
            rows = await conn.fetch(
                """
                SELECT key, newest_ts FROM pipeline_portal
                WHERE network = $1 AND sync = $2 AND history_complete
                """,
                network,
                sync,
            )
            if len(rows) < expected:
                return []
            claimed = await conn.fetchval(
                "UPDATE pipeline_sync SET decided = true WHERE network = $1 AND sync = $2 "
                "AND NOT decided RETURNING true",
                network,
                sync,
            )
            if not claimed:
                return []
            chosen = policy.rank_portals([(r["key"], r["newest_ts"]) for r in rows], n)
            await conn.execute(
                """
                UPDATE pipeline_portal SET room_requested = true, updated_at = now(),
                       state = CASE WHEN state = 'held' THEN 'waiting_for_room' ELSE state END
                WHERE key = ANY($1::text[]) AND NOT room_requested
                """,
                chosen,
            )
            return chosen

    async def record_error(self, key: str | None, error: str) -> None:
        if key is None:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE pipeline_portal SET last_error = $2, updated_at = now() WHERE key = $1",
                key,
                error[:2000],
            )

    # ------------------------------------------------------------ outbox

    async def command_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM pipeline_command_offset "
                "WHERE partition = ANY($1::int[])",
                list(partitions),
            )
        return {r["partition"]: r["next_offset"] for r in rows}

    async def pending_rooms(self, partitions: Sequence[int]) -> list[tuple[str, int, bytes]]:
        """Requested rooms whose CreateRoom is not in the log yet: (key, partition, bytes)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT key, network, portal, partition, info FROM pipeline_portal
                WHERE room_requested AND NOT create_room_produced
                  AND partition = ANY($1::int[])
                ORDER BY key
                """,
                list(partitions),
            )
        out = []
        for r in rows:
            info = decode(r["info"]) if r["info"] is not None else None
            cmd = CreateRoom(network=r["network"], portal=r["portal"])
            if isinstance(info, PortalInfo):
                cmd = CreateRoom(
                    network=r["network"],
                    portal=r["portal"],
                    name=info.name,
                    topic=info.topic,
                    members=info.members,
                    avatar_url=info.avatar_url,
                )
            out.append((r["key"], r["partition"], encode(cmd)))
        return out

    async def pending_sends(
        self, partitions: Sequence[int], after: tuple[str, int], limit: int
    ) -> list[asyncpg.Record]:
        """The next page of released, not yet produced commands, in (portal, seq) order.

        The page is read from the outbox partial index alone (only unproduced
        commands are in it), *then* joined to the portals: filtering on the
        portal's partition inside the page query let the planner (the tables
        are seldom analyzed) pick a seq scan of every message row plus a sort,
        per page, so a flush cost grew with all rows ever held. A page may hold
        commands of partitions not in ``partitions`` (another worker's): the
        caller skips them but still advances its cursor past the last row.
        """
        async with self.pool.acquire() as conn:
            return await conn.fetch(
                """
                SELECT m.portal_key, m.seq, m.record, p.partition,
                       p.partition = ANY($1::int[]) AS owned
                FROM (SELECT portal_key, seq, record FROM pipeline_message
                      WHERE seq IS NOT NULL AND NOT produced
                        AND (portal_key, seq) > ($2, $3)
                      ORDER BY portal_key, seq LIMIT $4) m
                JOIN pipeline_portal p ON p.key = m.portal_key
                ORDER BY m.portal_key, m.seq
                """,
                list(partitions),
                after[0],
                after[1],
                limit,
            )

    async def mark_produced(
        self,
        rooms: Sequence[str],
        sends: Sequence[tuple[str, int]],
        offsets: dict[int, int],
    ) -> None:
        """Record what is in the log (after the ack, or found by the recovery scan)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if rooms:
                await conn.execute(
                    """
                    UPDATE pipeline_portal SET create_room_produced = true,
                           room_requested = true,
                           state = CASE WHEN state = 'held' THEN 'waiting_for_room'
                                        ELSE state END
                    WHERE key = ANY($1::text[])
                    """,
                    list(rooms),
                )
            if sends:
                await conn.execute(
                    """
                    UPDATE pipeline_message m SET produced = true
                    FROM unnest($1::text[], $2::bigint[]) AS u(k, s)
                    WHERE m.portal_key = u.k AND m.seq = u.s AND NOT m.produced
                    """,
                    [k for k, _ in sends],
                    [s for _, s in sends],
                )
                await conn.execute(
                    """
                    UPDATE pipeline_portal p SET state = 'live', updated_at = now()
                    WHERE p.key = ANY($1::text[]) AND p.state = 'backfilling'
                      AND (SELECT 1 FROM pipeline_message m
                           WHERE m.portal_key = p.key AND m.seq IS NOT NULL
                             AND NOT m.produced LIMIT 1) IS NULL
                    """,
                    sorted({k for k, _ in sends}),
                )
            if offsets:
                await conn.execute(
                    """
                    INSERT INTO pipeline_command_offset (partition, next_offset)
                    SELECT * FROM unnest($1::int[], $2::bigint[])
                    ON CONFLICT (partition) DO UPDATE
                    SET next_offset = greatest(pipeline_command_offset.next_offset,
                                               EXCLUDED.next_offset)
                    """,
                    list(offsets),
                    list(offsets.values()),
                )

    async def settle_backfilling(self, partitions: Sequence[int]) -> None:
        """Portals in BACKFILLING with nothing left to produce are LIVE."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                """
                UPDATE pipeline_portal p SET state = 'live', updated_at = now()
                WHERE p.state = 'backfilling' AND p.partition = ANY($1::int[])
                  AND (SELECT 1 FROM pipeline_message m
                       WHERE m.portal_key = p.key AND m.seq IS NOT NULL AND NOT m.produced
                       LIMIT 1) IS NULL
                """,
                list(partitions),
            )


def _held(r: asyncpg.Record) -> policy.Held:
    return policy.Held(
        id=r["msg_id"],
        part=r["part"],
        ts=r["ts"],
        ord=r["ord"],
        live=r["live"],
        kind=r["kind"],
        target=r["target"],
    )


def send_command(record: bytes, seq: int) -> bytes:
    """The encoded SendMessage for a stored message: byte-identical to codec.encode.

    Built by concatenation so the flush never decodes and re-encodes a body.
    """
    return b'{"type":"send","message":' + record + b',"seq":' + str(seq).encode() + b"}"


_MESSAGE_FIELDS = tuple(f.name for f in fields(NetworkMessage))
_NESTED_FIELDS = {
    "sender": tuple(f.name for f in fields(Sender)),
    "content": tuple(f.name for f in fields(Content)),
}


def encode_message(m: NetworkMessage) -> bytes:
    """``codec.encode(m)`` for a message, byte for byte, without the generic walk.

    ``codec.to_dict`` inspects every field of every record; a message's shape
    is fixed (scalars plus the flat ``sender`` and ``content`` objects), so the
    dict is built straight from precomputed field names, unset fields left out.
    """
    out: dict[str, object] = {"type": NetworkMessage.TYPE}
    for name in _MESSAGE_FIELDS:
        value = getattr(m, name)
        if value is None:
            continue
        nested = _NESTED_FIELDS.get(name)
        if nested is not None:
            value = {n: v for n in nested if (v := getattr(value, n)) is not None}
        out[name] = value
    return orjson.dumps(out)

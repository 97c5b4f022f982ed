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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from backflow.settings import BackfillSettings
from pipeline import policy
from topics.codec import MAX_RECORD_BYTES, decode, encode
from topics.records import (
    CreateRoom,
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    RoomCreated,
    SyncComplete,
)

# Bumped when the tables change shape; a database of another version is refused
# with a clear error instead of failing on a missing column mid-batch.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

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
    -- The hold: message rows are numbered per portal as they arrive and never
    -- rewritten. History rows above history_decided and live rows above
    -- live_decided are held (plus live rows listed in pipeline_holdback).
    next_arrival bigint NOT NULL DEFAULT 1,
    history_decided bigint NOT NULL DEFAULT 0,
    live_decided bigint NOT NULL DEFAULT 0,
    held_history bigint NOT NULL DEFAULT 0,
    -- The outbox: seqs below next_seq are released (pipeline_release says
    -- which row each is); those up to produced_seq, and those listed in
    -- produced_extra, are in the command log.
    next_seq bigint NOT NULL DEFAULT 1,
    produced_seq bigint NOT NULL DEFAULT 0,
    produced_extra bigint[] NOT NULL DEFAULT '{}',
    dropped jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pipeline_portal_sync ON pipeline_portal (network, sync);
CREATE INDEX IF NOT EXISTS pipeline_portal_backfilling ON pipeline_portal (partition)
    WHERE state = 'backfilling';
CREATE INDEX IF NOT EXISTS pipeline_portal_create_pending ON pipeline_portal (partition)
    WHERE room_requested AND NOT create_room_produced;
CREATE INDEX IF NOT EXISTS pipeline_portal_outbox ON pipeline_portal (partition)
    WHERE next_seq > produced_seq + 1;

CREATE TABLE IF NOT EXISTS pipeline_message (
    portal_key text NOT NULL,
    arrival bigint NOT NULL,
    msg_id text NOT NULL,
    part int NOT NULL,
    ts bigint NOT NULL,
    ord bigint NOT NULL,
    live boolean NOT NULL,
    kind text NOT NULL,
    target text,
    record bytea NOT NULL,
    PRIMARY KEY (portal_key, arrival)
);
CREATE UNIQUE INDEX IF NOT EXISTS pipeline_message_id
    ON pipeline_message (portal_key, msg_id, part);

-- Released rows in seq order: seq = first_seq + position in arrivals.
CREATE TABLE IF NOT EXISTS pipeline_release (
    portal_key text NOT NULL,
    last_seq bigint NOT NULL,
    first_seq bigint NOT NULL,
    arrivals bigint[] NOT NULL,
    PRIMARY KEY (portal_key, last_seq)
);

CREATE TABLE IF NOT EXISTS pipeline_dropped (
    portal_key text NOT NULL,
    arrival bigint NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (portal_key, arrival)
);

-- Live rows at or below live_decided that are still held (a reaction, edit or
-- redaction whose target is held history): released with the next release.
CREATE TABLE IF NOT EXISTS pipeline_holdback (
    portal_key text NOT NULL,
    arrival bigint NOT NULL,
    PRIMARY KEY (portal_key, arrival)
);

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

# The held rows of one portal ($1), in policy.Held's field order. The range
# condition lets the primary key index start at the older watermark; the
# second one picks by the row's kind.
HELD_ROWS = """
SELECT m.msg_id, m.part, m.ts, m.ord, m.live, m.kind, m.target, m.arrival
FROM pipeline_portal p
JOIN pipeline_message m ON m.portal_key = p.key
 AND m.arrival > least(p.history_decided, p.live_decided)
 AND m.arrival > CASE WHEN m.live THEN p.live_decided ELSE p.history_decided END
WHERE p.key = $1
UNION ALL
SELECT m.msg_id, m.part, m.ts, m.ord, m.live, m.kind, m.target, m.arrival
FROM pipeline_holdback h
JOIN pipeline_message m ON m.portal_key = h.portal_key AND m.arrival = h.arrival
WHERE h.portal_key = $1
"""

# What became of some message ids ($2) of one portal ($1): 'held', 'released',
# or the drop reason. Sub-selects rather than joins: they are always index
# probes, whatever the planner thinks of the (seldom analyzed) tables.
ID_STATUS = """
SELECT m.msg_id,
       CASE WHEN m.arrival > CASE WHEN m.live THEN p.live_decided ELSE p.history_decided END
              OR (SELECT 1 FROM pipeline_holdback h
                  WHERE h.portal_key = m.portal_key AND h.arrival = m.arrival) IS NOT NULL
            THEN 'held'
            ELSE coalesce((SELECT d.reason FROM pipeline_dropped d
                           WHERE d.portal_key = m.portal_key AND d.arrival = m.arrival),
                          'released')
       END AS status
FROM pipeline_portal p JOIN pipeline_message m ON m.portal_key = p.key
WHERE p.key = $1 AND m.msg_id = ANY($2::text[])
"""

# Released rows of one release are stored in chunks of this many (one row each).
RELEASE_CHUNK = 1000

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
            existing = await conn.fetchval("SELECT to_regclass('pipeline_portal') IS NOT NULL")
            version = None
            if existing:
                if await conn.fetchval("SELECT to_regclass('pipeline_meta') IS NOT NULL"):
                    version = await conn.fetchval(
                        "SELECT value FROM pipeline_meta WHERE key = 'schema_version'"
                    )
                if version != str(SCHEMA_VERSION):
                    raise RuntimeError(
                        f"the pipeline tables in this database have schema version "
                        f"{version or 1}, this backflow needs {SCHEMA_VERSION}: point "
                        "database.url at a new database (or drop the pipeline_* tables "
                        "and replay the topics)"
                    )
            await conn.execute(SCHEMA)
            await conn.execute(
                "INSERT INTO pipeline_meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO NOTHING",
                str(SCHEMA_VERSION),
            )


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
    """The locked portal row, kept current in memory while a batch is applied."""

    key: str
    state: str
    room_requested: bool
    room_id: str | None
    next_seq: int
    last_bridged_ts: int | None
    last_bridged_id: str | None
    next_arrival: int


@dataclass(slots=True)
class OutboxPortal:
    """A portal with released commands that are not all in the command log."""

    key: str
    partition: int
    produced_seq: int
    produced_extra: frozenset[int]
    next_seq: int

    @property
    def pending(self) -> int:
        return self.next_seq - 1 - self.produced_seq - len(self.produced_extra)


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
                   last_bridged_id, next_arrival
            FROM pipeline_portal WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
            """,
            keys,
        )
        return {r["key"]: Portal(**dict(r)) for r in rows}

    # ------------------------------------------------------------ messages

    async def _messages(
        self, conn: asyncpg.Connection, run: list[Incoming], portals: dict[str, Portal]
    ) -> None:
        msgs: list[NetworkMessage] = [item.record for item in run]  # type: ignore[misc]
        keys = [m.key for m in msgs]
        arrivals = []
        for key in keys:
            portal = portals[key]
            arrivals.append(portal.next_arrival)
            portal.next_arrival += 1  # a duplicate that is not inserted leaves a gap: harmless
        lives = [item.topic == "live" or not m.history for item, m in zip(run, msgs, strict=True)]
        cols = (
            keys,
            arrivals,
            [m.id for m in msgs],
            [m.part for m in msgs],
            [m.ts for m in msgs],
            [item.offset for item in run],
            lives,
            [m.content.kind for m in msgs],
            [m.content.target for m in msgs],
            [stored_record(item) for item in run],
        )
        touched = sorted(set(keys))
        # One round trip: insert (the row is never rewritten after this), move
        # the portals' arrival counters, raise newest_ts and count held history
        # from the rows actually inserted, and return the new *live* rows
        # (history waits for HistoryComplete, so nothing else needs them).
        inserted = await conn.fetch(
            """
            WITH ins AS (
                INSERT INTO pipeline_message
                    (portal_key, arrival, msg_id, part, ts, ord, live, kind, target, record)
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[],
                                     $5::bigint[], $6::bigint[], $7::bool[], $8::text[],
                                     $9::text[], $10::bytea[])
                ON CONFLICT DO NOTHING
                RETURNING portal_key, arrival, ts, live
            ), counts AS (
                SELECT portal_key, max(ts) AS ts, count(*) FILTER (WHERE NOT live) AS history
                FROM ins GROUP BY portal_key
            ), portals AS (
                UPDATE pipeline_portal p SET next_arrival = u.next_arrival,
                       newest_ts = greatest(p.newest_ts, c.ts),
                       held_history = p.held_history + coalesce(c.history, 0),
                       updated_at = now()
                FROM unnest($11::text[], $12::bigint[]) AS u(key, next_arrival)
                LEFT JOIN counts c ON c.portal_key = u.key
                WHERE p.key = u.key
            )
            SELECT portal_key, arrival FROM ins WHERE live
            """,
            *cols,
            touched,
            [portals[k].next_arrival for k in touched],
        )
        if not inserted:
            return
        # Live messages: forward at once into an existing room, or request
        # the room (a live message always does, whatever the sync ranking).
        forward: dict[str, list[policy.Held]] = {}
        live_at = {(keys[i], arrivals[i]): i for i, live in enumerate(lives) if live}
        for r in sorted(inserted, key=lambda r: r["arrival"]):
            portal = portals[r["portal_key"]]
            if portal.state in _ROOM_STATES:
                i = live_at[(portal.key, r["arrival"])]
                m = msgs[i]
                forward.setdefault(portal.key, []).append(
                    policy.Held(
                        m.id,
                        m.part,
                        m.ts,
                        run[i].offset,
                        True,
                        m.content.kind,
                        m.content.target,
                        arrivals[i],
                    )
                )
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
            for msg_id, status in await self._id_status(conn, portal, targets):
                if status in ("released", policy.BEFORE_LAST_BRIDGED):
                    sent.add(msg_id)
                elif status == "held":
                    held.add(msg_id)
        release: list[policy.Held] = []
        dropped: list[tuple[policy.Held, str]] = []
        holdback: list[policy.Held] = []
        for m in msgs:
            decision = policy.live_decision(m, sent=sent, held=held)
            if decision is None:
                release.append(m)
                sent.add(m.id)
            elif decision == "hold":
                holdback.append(m)
            else:
                dropped.append((m, decision))
        await self._write_plan(
            conn, portal, release, dropped, holdback=holdback, live_upto=msgs[-1].arrival
        )

    async def _id_status(
        self, conn: asyncpg.Connection, portal: Portal, ids: Iterable[str | None]
    ) -> list[tuple[str, str]]:
        rows = await conn.fetch(ID_STATUS, portal.key, sorted({i for i in ids if i}))
        return [(r["msg_id"], r["status"]) for r in rows]

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
            portal.room_id, portal.room_requested = rec.room_id, True
            catch_up = rec.last_bridged_ts is not None
            await self._release(
                conn, portal, catch_up=catch_up, last_ts=rec.last_bridged_ts, room=rec
            )

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
        self,
        conn: asyncpg.Connection,
        portal: Portal,
        *,
        catch_up: bool,
        last_ts: int | None,
        room: RoomCreated | None = None,
    ) -> None:
        """Plan and record the release of everything held (commands go to the outbox)."""
        held = [policy.Held(*r) for r in await conn.fetch(HELD_ROWS, portal.key)]
        lookup = {m.target for m in held if m.dependent}
        if last_ts is not None:
            lookup |= {m.id for m in held if m.ts == last_ts}
        bridged: set[str] = set()
        if lookup:
            bridged = {
                msg_id
                for msg_id, status in await self._id_status(conn, portal, lookup)
                if status in ("released", policy.BEFORE_LAST_BRIDGED)
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
        await self._write_plan(conn, portal, plan.release, plan.dropped, room=room)

    async def _write_plan(
        self,
        conn: asyncpg.Connection,
        portal: Portal,
        release: list[policy.Held],
        dropped: list[tuple[policy.Held, str]],
        *,
        holdback: Sequence[policy.Held] = (),
        live_upto: int | None = None,
        room: RoomCreated | None = None,
    ) -> None:
        """Record a decision in the caller's transaction, in one statement.

        Released rows get the next seqs (``pipeline_release`` chunks), dropped
        ones their reason, and the portal its new watermarks. A release
        (``live_upto`` None) decided every held row of the portal: both
        watermarks move to the newest row and the holdback list empties.
        Forwarding live rows (``live_upto``: the newest of them) decided those
        rows only, minus ``holdback``; history_decided follows along only while
        no history is held, so the next release's scan stays short. ``room``:
        the RoomCreated that triggered this release, recorded on the portal.
        """
        counts: dict[str, int] = {}
        for _, reason in dropped:
            counts[reason] = counts.get(reason, 0) + 1
        newest = max(release, key=policy.release_order, default=None)
        if newest is not None and (
            portal.last_bridged_ts is None or newest.ts >= portal.last_bridged_ts
        ):
            portal.last_bridged_ts, portal.last_bridged_id = newest.ts, newest.id
        # A release into a new room shows BACKFILLING until the flush has the
        # whole outbox in the log; a LIVE portal stays LIVE while forwarding.
        new_state = LIVE if portal.state == LIVE else BACKFILLING
        next_seq = portal.next_seq + len(release)
        await conn.execute(
            """
            WITH released AS (
                INSERT INTO pipeline_release (portal_key, first_seq, last_seq, arrivals)
                SELECT $1, $2 + s, $2 + least(s + $3, cardinality($4::bigint[])) - 1,
                       ($4::bigint[])[s + 1 : least(s + $3, cardinality($4::bigint[]))]
                FROM generate_series(0, cardinality($4::bigint[]) - 1, $3) AS s
            ), dropped AS (
                INSERT INTO pipeline_dropped (portal_key, arrival, reason)
                SELECT $1, * FROM unnest($5::bigint[], $6::text[]) ON CONFLICT DO NOTHING
            ), unheld AS (
                DELETE FROM pipeline_holdback WHERE portal_key = $1 AND $7::bigint IS NULL
            ), heldback AS (
                INSERT INTO pipeline_holdback (portal_key, arrival)
                SELECT $1, unnest($8::bigint[]) ON CONFLICT DO NOTHING
            )
            UPDATE pipeline_portal SET state = $9, next_seq = $10, last_bridged_ts = $11,
                   last_bridged_id = $12, updated_at = now(),
                   live_decided = coalesce(greatest(live_decided, $7), $13),
                   history_decided = CASE WHEN $7::bigint IS NULL THEN $13
                                          WHEN held_history = 0
                                          THEN greatest(history_decided, $7)
                                          ELSE history_decided END,
                   held_history = CASE WHEN $7::bigint IS NULL THEN 0 ELSE held_history END,
                   room_id = coalesce($15, room_id), alias = coalesce($16, alias),
                   room_requested = room_requested OR $15::text IS NOT NULL,
                   create_room_produced = create_room_produced OR $15::text IS NOT NULL,
                   dropped = CASE WHEN $14::jsonb = '{}'::jsonb THEN dropped ELSE (
                       SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
                           SELECT k, sum(v::bigint) AS v FROM (
                               SELECT * FROM jsonb_each_text(dropped)
                               UNION ALL SELECT * FROM jsonb_each_text($14::jsonb)) AS a(k, v)
                           GROUP BY k) AS s) END
            WHERE key = $1
            """,
            portal.key,
            portal.next_seq,
            RELEASE_CHUNK,
            [m.arrival for m in release],
            [m.arrival for m, _ in dropped],
            [reason for _, reason in dropped],
            live_upto,
            [m.arrival for m in holdback],
            new_state,
            next_seq,
            portal.last_bridged_ts,
            portal.last_bridged_id,
            portal.next_arrival - 1,
            json.dumps(counts),
            room.room_id if room is not None else None,
            room.alias if room is not None else None,
        )
        portal.state, portal.next_seq = new_state, next_seq

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

    async def outbox_portals(self, partitions: Sequence[int]) -> list[OutboxPortal]:
        """Portals of these partitions with released commands not yet in the log."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT key, partition, produced_seq, produced_extra, next_seq
                FROM pipeline_portal
                WHERE partition = ANY($1::int[]) AND next_seq > produced_seq + 1
                ORDER BY key
                """,
                list(partitions),
            )
        return [
            OutboxPortal(
                key=r["key"],
                partition=r["partition"],
                produced_seq=r["produced_seq"],
                produced_extra=frozenset(r["produced_extra"]),
                next_seq=r["next_seq"],
            )
            for r in rows
        ]

    async def outbox_page(
        self, portals: Sequence[OutboxPortal], limit: int
    ) -> list[tuple[OutboxPortal, int, bytes]]:
        """The next commands of these portals not yet in the log: (portal, seq, record).

        In (portal, seq) order, at most ``limit`` of them.
        Both reads are per-portal index probes (LATERAL with OFFSET 0 keeps the
        planner from turning them into a hash join over the whole table).
        """
        by_key = {p.key: p for p in portals}
        async with self.pool.acquire() as conn:
            chunks = await conn.fetch(
                """
                SELECT u.key, r.first_seq, r.arrivals
                FROM unnest($1::text[], $2::bigint[]) AS u(key, done)
                CROSS JOIN LATERAL (
                    SELECT first_seq, arrivals FROM pipeline_release r
                    WHERE r.portal_key = u.key AND r.last_seq > u.done
                    ORDER BY r.last_seq LIMIT $3) AS r
                ORDER BY u.key, r.first_seq
                """,
                list(by_key),
                [p.produced_seq for p in by_key.values()],
                limit,
            )
            wanted: list[tuple[OutboxPortal, int, int]] = []
            for chunk in chunks:
                portal = by_key[chunk["key"]]
                for seq, arrival in enumerate(chunk["arrivals"], chunk["first_seq"]):
                    if seq > portal.produced_seq and seq not in portal.produced_extra:
                        wanted.append((portal, seq, arrival))
                if len(wanted) >= limit:
                    del wanted[limit:]
                    break
            if not wanted:
                return []
            rows = await conn.fetch(
                """
                SELECT u.key, u.arrival, m.record
                FROM unnest($1::text[], $2::bigint[]) AS u(key, arrival)
                CROSS JOIN LATERAL (
                    SELECT record FROM pipeline_message m
                    WHERE m.portal_key = u.key AND m.arrival = u.arrival OFFSET 0) AS m
                """,
                [p.key for p, _, _ in wanted],
                [a for _, _, a in wanted],
            )
        records = {(r["key"], r["arrival"]): r["record"] for r in rows}
        page = []
        for portal, seq, arrival in wanted:
            record = records.get((portal.key, arrival))
            if record is None:  # cannot happen (rows are never deleted); stop before a gap
                break
            page.append((portal, seq, record))
        return page

    async def mark_produced(
        self,
        rooms: Sequence[str],
        sends: Mapping[str, Iterable[int]],
        offsets: dict[int, int],
    ) -> None:
        """Record what is in the log (after the ack, or found by the recovery scan).

        ``sends`` maps a portal to seqs now known to be in the log; its
        ``produced_seq`` moves over every contiguous one (the rest, beyond a
        gap a failed produce left, are remembered in ``produced_extra``).
        """
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
                # Lock in key order, like apply does, so the two never deadlock.
                rows = await conn.fetch(
                    """
                    SELECT key, produced_seq, produced_extra FROM pipeline_portal
                    WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
                    """,
                    sorted(sends),
                )
                keys, dones, extras = [], [], []
                for r in rows:
                    done, extra = policy.advance_produced(
                        r["produced_seq"], r["produced_extra"], sends[r["key"]]
                    )
                    keys.append(r["key"])
                    dones.append(done)
                    extras.append(",".join(map(str, extra)))
                await conn.execute(
                    """
                    UPDATE pipeline_portal p SET produced_seq = u.done,
                           produced_extra = string_to_array(u.extra, ',')::bigint[],
                           state = CASE WHEN p.state = 'backfilling'
                                         AND p.next_seq <= u.done + 1 + cardinality(
                                             string_to_array(u.extra, ','))
                                        THEN 'live' ELSE p.state END,
                           updated_at = now()
                    FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(key, done, extra)
                    WHERE p.key = u.key
                    """,
                    keys,
                    dones,
                    extras,
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
                UPDATE pipeline_portal SET state = 'live', updated_at = now()
                WHERE state = 'backfilling' AND partition = ANY($1::int[])
                  AND next_seq <= produced_seq + 1 + cardinality(produced_extra)
                """,
                list(partitions),
            )


def send_command(record: bytes, seq: int) -> bytes:
    """The encoded SendMessage for a stored message: byte-identical to codec.encode.

    Built by concatenation so the flush never decodes and re-encodes a body.
    """
    return b'{"type":"send","message":' + record + b',"seq":' + str(seq).encode() + b"}"


def stored_record(item: Incoming) -> bytes:
    """The bytes a held message is stored (and later sent) as: the record as published.

    It passed the codec's validation on the way in, and every reader decodes it
    with the same codec, so re-encoding it would only cost time (~2 us a
    message). A record too close to the size limit to fit in a SendMessage is
    re-encoded instead, which drops anything the codec does not know.
    """
    if item.raw and len(item.raw) <= MAX_RECORD_BYTES - 100:
        return item.raw
    return encode(item.record)

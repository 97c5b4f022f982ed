"""Durable pipeline state in Postgres: portals, the hold store, the command outbox.

Why Postgres and not faust tables (or memory):
- a portal's backlog is never one in-memory value: every held message is its
  own row, so a worker holding millions of messages stays at constant memory;
- a release reads only the held rows' metadata (an index range scan per
  portal), never their bodies, which go to the producer in pages;
- the ``max_initial_conversations`` ranking needs every portal of a sync at
  once, and those live on other partitions/workers: Postgres is the shared view;
- the outbox (commands with their per-portal ``seq``) is written in the same
  transaction that records the release, so a crash can never separate them.

A message row is written once and never updated (see SCHEMA and
docs/pipeline.md, "The hold store"); decisions are watermarks, release chunks
and a per-portal produced seq. Rows are keyed so that redelivered records are
no-ops: (portal, message id, part) for messages, the portal key for portals.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from pipeline import batch as batch_mod
from pipeline import portal as portal_mod
from pipeline.batch import Incoming
from pipeline.portal import ALL_PRODUCED, ROOM_REQUESTED, Held, Portal, PortalState
from topics.codec import MAX_RECORD_BYTES, decode, encode
from topics.records import (
    CreateRoom,
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    RoomCreated,
)
from topics.settings import BackfillSettings

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
    state text NOT NULL,
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
    WHERE state = '{backfilling}';
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

# The held rows of several portals: per portal (key, its watermarks, upto),
# the rows above the watermarks up to ``upto``, plus its holdback rows; the
# columns are named as Held's fields. LATERAL with OFFSET 0: always an index range scan
# per portal, never a hash join over the whole table (the tables are seldom
# analyzed, so the planner's estimates cannot be trusted).
HELD_ROWS = """
SELECT u.key AS portal_key, m.msg_id AS id, m.part, m.ts, m.ord, m.live, m.kind,
       m.target, m.arrival
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS u(key, hist, live, upto)
CROSS JOIN LATERAL (
    SELECT * FROM pipeline_message m
    WHERE m.portal_key = u.key AND m.arrival > least(u.hist, u.live) AND m.arrival <= u.upto
      AND m.arrival > CASE WHEN m.live THEN u.live ELSE u.hist END
    OFFSET 0) AS m
UNION ALL
SELECT h.portal_key, m.msg_id, m.part, m.ts, m.ord, m.live, m.kind, m.target, m.arrival
FROM pipeline_holdback h
CROSS JOIN LATERAL (
    SELECT * FROM pipeline_message m
    WHERE m.portal_key = h.portal_key AND m.arrival = h.arrival OFFSET 0) AS m
WHERE h.portal_key = ANY($1::text[])
"""

# What became of some message ids: per (portal key, message id, the portal's
# watermarks) the status of each part: $5 (portal.STATUS_HELD), the drop
# reason, or $6 (portal.STATUS_RELEASED).
ID_STATUS = """
SELECT u.key, u.msg_id,
       CASE WHEN m.arrival > CASE WHEN m.live THEN u.live ELSE u.hist END
              OR (SELECT 1 FROM pipeline_holdback h
                  WHERE h.portal_key = u.key AND h.arrival = m.arrival) IS NOT NULL
            THEN $5::text
            ELSE coalesce((SELECT d.reason FROM pipeline_dropped d
                           WHERE d.portal_key = u.key AND d.arrival = m.arrival),
                          $6::text)
       END AS status
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(key, msg_id, hist, live)
CROSS JOIN LATERAL (
    SELECT arrival, live FROM pipeline_message m
    WHERE m.portal_key = u.key AND m.msg_id = u.msg_id OFFSET 0) AS m
"""

# Released rows of one release are stored in chunks of this many (one row each).
RELEASE_CHUNK = 1000

# One round's decisions. Each part is a no-op on empty arrays. A portal is
# either released (unhold) or forwarded (holdback) in one round, never both.
WRITE_DECISIONS = """
WITH released AS (
    INSERT INTO pipeline_release (portal_key, first_seq, last_seq, arrivals)
    SELECT c.key, c.first_seq, c.first_seq + c.n - 1,
           ($5::bigint[])[c.start : c.start + c.n - 1]
    FROM unnest($1::text[], $2::bigint[], $3::int[], $4::int[])
         AS c(key, first_seq, start, n)
), dropped AS (
    INSERT INTO pipeline_dropped (portal_key, arrival, reason)
    SELECT * FROM unnest($6::text[], $7::bigint[], $8::text[])
    ON CONFLICT DO NOTHING
), unheld AS (
    DELETE FROM pipeline_holdback WHERE portal_key = ANY($9::text[])
)
INSERT INTO pipeline_holdback (portal_key, arrival)
SELECT * FROM unnest($10::text[], $11::bigint[]) ON CONFLICT DO NOTHING
"""

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
            await conn.execute(SCHEMA.replace("{backfilling}", PortalState.BACKFILLING.value))
            await conn.execute(
                "INSERT INTO pipeline_meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO NOTHING",
                str(SCHEMA_VERSION),
            )


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


class Store:
    """All reads and writes of the pipeline, one transaction per call."""

    def __init__(self, pool: asyncpg.Pool, backfill: BackfillSettings) -> None:
        self.pool = pool
        self.backfill = backfill

    # ------------------------------------------------------------ batches

    async def apply(self, batch: Sequence[Incoming]) -> Outcome:
        """Apply a batch of records (in partition order) in one transaction.

        A handful of statements whatever the batch holds: lock the portals,
        insert every message row, then per round (a portal's first release or
        forward, then its second, ...) one read of what is held and of the
        targets it needs, one write of the decisions; finally the portals.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            portals = await self._lock_portals(conn, batch)
            walked = batch_mod.walk(batch, portals, self.backfill)
            inserted_live = await self._insert_messages(conn, walked)
            rounds = max((len(a) for a in walked.actions.values()), default=0)
            for n in range(rounds):
                step = [(portals[k], a[n]) for k, a in walked.actions.items() if len(a) > n]
                await self._decide(conn, step, inserted_live)
            await self._write_portals(conn, portals.values())
            if walked.syncs:
                await conn.execute(
                    """
                    INSERT INTO pipeline_sync (network, sync, portals)
                    SELECT * FROM unnest($1::text[], $2::text[], $3::int[])
                    ON CONFLICT (network, sync) DO UPDATE SET portals = EXCLUDED.portals
                    """,
                    [s.network for s in walked.syncs],
                    [s.sync for s in walked.syncs],
                    [s.portals for s in walked.syncs],
                )
        return Outcome(syncs=walked.decide)

    async def apply_one(self, item: Incoming) -> Outcome:
        """Fallback when a batch failed: one record, so a bad one is isolated."""
        return await self.apply([item])

    async def _lock_portals(
        self, conn: asyncpg.Connection, batch: Sequence[Incoming]
    ) -> dict[str, Portal]:
        seen: dict[str, tuple[str, str, int]] = {}
        for item in batch:
            rec = item.record
            if isinstance(rec, NetworkMessage | PortalInfo | HistoryComplete | RoomCreated):
                key = rec.key
                if key not in seen:
                    seen[key] = (rec.network, rec.portal, item.partition)
        if not seen:
            return {}
        keys = sorted(seen)
        await conn.execute(
            """
            INSERT INTO pipeline_portal (key, network, portal, partition, state)
            SELECT *, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::int[])
            ON CONFLICT (key) DO NOTHING
            """,
            keys,
            [seen[k][0] for k in keys],
            [seen[k][1] for k in keys],
            [seen[k][2] for k in keys],
            PortalState.HELD.value,
        )
        # Row locks in key order: a portal's events seen on an unexpected
        # partition (another worker) serialise here instead of racing on seq.
        rows = await conn.fetch(
            """
            SELECT key, state, room_requested, room_id, alias, next_seq, last_bridged_ts,
                   last_bridged_id, next_arrival, history_decided, live_decided, held_history
            FROM pipeline_portal WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
            """,
            keys,
        )
        return {r["key"]: Portal(**dict(r)) for r in rows}

    async def _insert_messages(
        self, conn: asyncpg.Connection, walked: batch_mod.Walked
    ) -> set[tuple[str, int]]:
        """Insert the batch's message rows (never rewritten); the new live rows."""
        if not walked.items:
            return set()
        msgs: list[NetworkMessage] = [item.record for item in walked.items]  # type: ignore[misc]
        columns = (
            walked.keys,
            walked.arrivals,
            [m.id for m in msgs],
            [m.part for m in msgs],
            [m.ts for m in msgs],
            [item.offset for item in walked.items],
            walked.lives,
            [m.content.kind for m in msgs],
            [m.content.target for m in msgs],
            [stored_record(item) for item in walked.items],
        )
        insert = """
            INSERT INTO pipeline_message
                (portal_key, arrival, msg_id, part, ts, ord, live, kind, target, record)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[],
                                 $5::bigint[], $6::bigint[], $7::bool[], $8::text[],
                                 $9::text[], $10::bytea[])
            ON CONFLICT DO NOTHING
        """
        if not any(walked.lives):
            await conn.execute(insert, *columns)
            return set()
        # Only live rows that are new may be forwarded (a redelivered one was already).
        rows = await conn.fetch(
            f"WITH ins AS ({insert} RETURNING portal_key, arrival, live) "
            "SELECT portal_key, arrival FROM ins WHERE live",
            *columns,
        )
        return {(r["portal_key"], r["arrival"]) for r in rows}

    async def _decide(
        self,
        conn: asyncpg.Connection,
        step: list[tuple[Portal, portal_mod.Release | portal_mod.Forward]],
        inserted_live: set[tuple[str, int]],
    ) -> None:
        """Read what one round (an action per portal) needs, plan it (pure), persist it."""
        releases = [(p, a) for p, a in step if isinstance(a, portal_mod.Release)]
        forwards = []
        for p, a in step:
            if isinstance(a, portal_mod.Forward):
                a.msgs = [m for m in a.msgs if (p.key, m.arrival) in inserted_live]
                if a.msgs:
                    forwards.append((p, a))
        held: dict[str, list[Held]] = {}
        if releases:
            rows = await conn.fetch(
                HELD_ROWS,
                [p.key for p, _ in releases],
                [a.history_decided for _, a in releases],
                [a.live_decided for _, a in releases],
                [a.upto for _, a in releases],
            )
            for r in rows:
                held.setdefault(r["portal_key"], []).append(
                    Held(
                        id=r["id"],
                        part=r["part"],
                        ts=r["ts"],
                        ord=r["ord"],
                        live=r["live"],
                        kind=r["kind"],
                        target=r["target"],
                        arrival=r["arrival"],
                    )
                )
        lookup = portal_mod.lookups(releases, forwards, held)
        status: dict[tuple[str, str], set[str]] = {}
        if lookup:
            columns = map(list, zip(*lookup, strict=True))
            statuses = (portal_mod.STATUS_HELD, portal_mod.STATUS_RELEASED)
            for r in await conn.fetch(ID_STATUS, *columns, *statuses):
                status.setdefault((r["key"], r["msg_id"]), set()).add(r["status"])
        decisions = portal_mod.plan_round(releases, forwards, held, status, self.backfill)
        await _write_decisions(conn, decisions)

    async def _write_portals(self, conn: asyncpg.Connection, portals: Iterable[Portal]) -> None:
        """Write back what the batch did to its portals (they are locked)."""
        ps = list(portals)
        if not ps:
            return
        await conn.execute(
            """
            UPDATE pipeline_portal p SET
                state = u.state, room_requested = u.room_requested,
                room_id = u.room_id, alias = u.alias,
                create_room_produced = p.create_room_produced OR u.room_created,
                info = coalesce(u.info, p.info),
                history_complete = p.history_complete OR u.history_complete,
                sync = coalesce(u.sync, p.sync),
                newest_ts = greatest(p.newest_ts, u.newest_ts),
                next_arrival = u.next_arrival, next_seq = u.next_seq,
                last_bridged_ts = u.last_bridged_ts, last_bridged_id = u.last_bridged_id,
                history_decided = u.history_decided, live_decided = u.live_decided,
                held_history = u.held_history,
                dropped = CASE WHEN u.dropped = '{}' THEN p.dropped ELSE (
                    SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
                        SELECT k, sum(v::bigint) AS v FROM (
                            SELECT * FROM jsonb_each_text(p.dropped)
                            UNION ALL SELECT * FROM jsonb_each_text(u.dropped::jsonb)) AS a(k, v)
                        GROUP BY k) AS s) END,
                updated_at = now()
            FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[], $6::bool[],
                        $7::bytea[], $8::bool[], $9::text[], $10::bigint[], $11::bigint[],
                        $12::bigint[], $13::bigint[], $14::text[], $15::bigint[],
                        $16::bigint[], $17::bigint[], $18::text[])
                 AS u(key, state, room_requested, room_id, alias, room_created, info,
                      history_complete, sync, newest_ts, next_arrival, next_seq,
                      last_bridged_ts, last_bridged_id, history_decided, live_decided,
                      held_history, dropped)
            WHERE p.key = u.key
            """,
            [p.key for p in ps],
            [p.state for p in ps],
            [p.room_requested for p in ps],
            [p.room_id for p in ps],
            [p.alias for p in ps],
            [p.room_created for p in ps],
            [p.info for p in ps],
            [p.history_complete for p in ps],
            [p.sync for p in ps],
            [p.newest_ts for p in ps],
            [p.next_arrival for p in ps],
            [p.next_seq for p in ps],
            [p.last_bridged_ts for p in ps],
            [p.last_bridged_id for p in ps],
            [p.history_decided for p in ps],
            [p.live_decided for p in ps],
            [p.held_history for p in ps],
            [json.dumps(p.dropped) if p.dropped else "{}" for p in ps],
        )

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
            chosen = portal_mod.rank_portals([(r["key"], r["newest_ts"]) for r in rows], n)
            await conn.execute(
                """
                UPDATE pipeline_portal SET room_requested = true, updated_at = now(),
                       state = CASE WHEN state = $2 THEN $3 ELSE state END
                WHERE key = ANY($1::text[]) AND NOT room_requested
                """,
                chosen,
                ROOM_REQUESTED.source.value,
                ROOM_REQUESTED.target.value,
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
            # The records in the order asked for (ordinality), only the bytes.
            records = await conn.fetch(
                """
                SELECT m.record
                FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(key, arrival, i)
                CROSS JOIN LATERAL (
                    SELECT record FROM pipeline_message m
                    WHERE m.portal_key = u.key AND m.arrival = u.arrival OFFSET 0) AS m
                ORDER BY u.i
                """,
                [p.key for p, _, _ in wanted],
                [a for _, _, a in wanted],
            )
        if len(records) != len(wanted):  # cannot happen: rows are never deleted
            raise RuntimeError("outbox rows missing from pipeline_message")
        return [(p, seq, r[0]) for (p, seq, _), r in zip(wanted, records, strict=True)]

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
                           state = CASE WHEN state = $2 THEN $3 ELSE state END
                    WHERE key = ANY($1::text[])
                    """,
                    list(rooms),
                    ROOM_REQUESTED.source.value,
                    ROOM_REQUESTED.target.value,
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
                    done, extra = portal_mod.advance_produced(
                        r["produced_seq"], r["produced_extra"], sends[r["key"]]
                    )
                    keys.append(r["key"])
                    dones.append(done)
                    extras.append(",".join(map(str, extra)))
                await conn.execute(
                    """
                    UPDATE pipeline_portal p SET produced_seq = u.done,
                           produced_extra = string_to_array(u.extra, ',')::bigint[],
                           state = CASE WHEN p.state = $4
                                         AND p.next_seq <= u.done + 1 + cardinality(
                                             string_to_array(u.extra, ','))
                                        THEN $5 ELSE p.state END,
                           updated_at = now()
                    FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(key, done, extra)
                    WHERE p.key = u.key
                    """,
                    keys,
                    dones,
                    extras,
                    ALL_PRODUCED.source.value,
                    ALL_PRODUCED.target.value,
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
                UPDATE pipeline_portal SET state = $3, updated_at = now()
                WHERE state = $2 AND partition = ANY($1::int[])
                  AND next_seq <= produced_seq + 1 + cardinality(produced_extra)
                """,
                list(partitions),
                ALL_PRODUCED.source.value,
                ALL_PRODUCED.target.value,
            )


async def _write_decisions(
    conn: asyncpg.Connection, decisions: Sequence[portal_mod.Decision]
) -> None:
    """Persist one round's decisions, for many portals, in one statement.

    Released rows are stored in chunks of RELEASE_CHUNK arrivals (one row each).
    """
    chunk_keys: list[str] = []
    chunk_first: list[int] = []
    chunk_start: list[int] = []  # 1-based, into arrivals
    chunk_len: list[int] = []
    arrivals: list[int] = []
    dropped: tuple[list[str], list[int], list[str]] = ([], [], [])
    holdback: tuple[list[str], list[int]] = ([], [])
    unhold: list[str] = []
    for d in decisions:
        key = d.portal.key
        for start in range(0, len(d.release), RELEASE_CHUNK):
            chunk = d.release[start : start + RELEASE_CHUNK]
            chunk_keys.append(key)
            chunk_first.append(d.first_seq + start)
            chunk_start.append(len(arrivals) + 1)
            chunk_len.append(len(chunk))
            arrivals += [m.arrival for m in chunk]
        for m, reason in d.dropped:
            dropped[0].append(key)
            dropped[1].append(m.arrival)
            dropped[2].append(reason)
        for m in d.holdback:
            holdback[0].append(key)
            holdback[1].append(m.arrival)
        if d.unhold:
            unhold.append(key)
    if not (chunk_keys or dropped[0] or holdback[0] or unhold):
        return
    await conn.execute(
        WRITE_DECISIONS,
        chunk_keys,
        chunk_first,
        chunk_start,
        chunk_len,
        arrivals,
        *dropped,
        unhold,
        *holdback,
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

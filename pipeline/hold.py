"""The hold store in Postgres: apply record batches, hold messages, record releases.

``HoldStore.apply`` takes a batch in partition order, locks its portals,
inserts every message row (never rewritten), lets ``pipeline.batch.walk`` and
``pipeline.portal.plan_round`` decide (pure), and persists the decisions: the
released rows with their seqs (the outbox, read by pipeline.outbox), drops,
holdbacks and the portals' new watermarks and states, in one transaction.
The tables are in pipeline.schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from pipeline import batch as batch_mod
from pipeline import portal as portal_mod
from pipeline.intake import Incoming
from pipeline.portal import ROOM_REQUESTED, Held, Portal, PortalState
from topics.codec import stored_message
from topics.records import HistoryComplete, NetworkMessage, PortalInfo, RoomCreated
from topics.settings import BackfillSettings

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

INSERT_PORTALS = """
INSERT INTO pipeline_portal (key, network, portal, partition, state)
SELECT *, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::int[])
ON CONFLICT (key) DO NOTHING
"""

# Row locks in key order: a portal's events seen on an unexpected partition
# (another worker) serialise here instead of racing on seq. The columns are
# named as Portal's fields.
LOCK_PORTALS = """
SELECT key, state, room_requested, room_id, alias, next_seq, last_bridged_ts,
       last_bridged_id, next_arrival, history_decided, live_decided, held_history
FROM pipeline_portal WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
"""

INSERT_MESSAGES = """
INSERT INTO pipeline_message
    (portal_key, arrival, msg_id, part, ts, ord, live, kind, target, record)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[],
                     $5::bigint[], $6::bigint[], $7::bool[], $8::text[],
                     $9::text[], $10::bytea[])
ON CONFLICT DO NOTHING
"""
INSERT_MESSAGES_NEW_LIVE = f"""
WITH ins AS ({INSERT_MESSAGES} RETURNING portal_key, arrival, live)
SELECT portal_key, arrival FROM ins WHERE live
"""

# What a batch did to its (locked) portals; drop counts are added up.
WRITE_PORTALS = """
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
"""

UPSERT_SYNCS = """
INSERT INTO pipeline_sync (network, sync, portals)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[])
ON CONFLICT (network, sync) DO UPDATE SET portals = EXCLUDED.portals
"""
SYNC_EXPECTED = (
    "SELECT portals FROM pipeline_sync WHERE network = $1 AND sync = $2 AND NOT decided"
)
SYNC_COMPLETE_PORTALS = """
SELECT key, newest_ts FROM pipeline_portal
WHERE network = $1 AND sync = $2 AND history_complete
"""
CLAIM_SYNC = """
UPDATE pipeline_sync SET decided = true WHERE network = $1 AND sync = $2 AND NOT decided
RETURNING true
"""
# $2 -> $3: portal.ROOM_REQUESTED.
REQUEST_ROOMS = """
UPDATE pipeline_portal SET room_requested = true, updated_at = now(),
       state = CASE WHEN state = $2 THEN $3 ELSE state END
WHERE key = ANY($1::text[]) AND NOT room_requested
"""
RECORD_ERROR = "UPDATE pipeline_portal SET last_error = $2, updated_at = now() WHERE key = $1"


@dataclass(slots=True)
class Outcome:
    """What a batch changed that needs follow-up outside its transaction."""

    syncs: set[tuple[str, str]] = field(default_factory=set)


class HoldStore:
    """Applies batches to the hold; the sync ranking; one transaction per call."""

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
                    UPSERT_SYNCS,
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
            INSERT_PORTALS,
            keys,
            [seen[k][0] for k in keys],
            [seen[k][1] for k in keys],
            [seen[k][2] for k in keys],
            PortalState.HELD.value,
        )
        # Row locks in key order: a portal's events seen on an unexpected
        # partition (another worker) serialise here instead of racing on seq.
        rows = await conn.fetch(LOCK_PORTALS, keys)
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
            [stored_message(item.record, item.raw) for item in walked.items],
        )
        if not any(walked.lives):
            await conn.execute(INSERT_MESSAGES, *columns)
            return set()
        # Only live rows that are new may be forwarded (a redelivered one was already).
        rows = await conn.fetch(INSERT_MESSAGES_NEW_LIVE, *columns)
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
            WRITE_PORTALS,
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
            expected = await conn.fetchval(SYNC_EXPECTED, network, sync)
            if expected is None:
                return []
            rows = await conn.fetch(SYNC_COMPLETE_PORTALS, network, sync)
            if len(rows) < expected:
                return []
            claimed = await conn.fetchval(CLAIM_SYNC, network, sync)
            if not claimed:
                return []
            chosen = portal_mod.rank_portals([(r["key"], r["newest_ts"]) for r in rows], n)
            await conn.execute(
                REQUEST_ROOMS,
                chosen,
                ROOM_REQUESTED.source.value,
                ROOM_REQUESTED.target.value,
            )
            return chosen

    async def record_error(self, key: str | None, error: str) -> None:
        """Remember a portal's last processing error (``backflow status`` shows it)."""
        if key is None or "\x00" in key:
            return  # no such portal row can exist (Postgres text cannot hold U+0000)
        error = error.replace("\x00", "\\x00")
        async with self.pool.acquire() as conn:
            await conn.execute(RECORD_ERROR, key, error[:2000])


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

"""The pipeline's tables in Postgres and their version check.

Why Postgres and not faust tables (or memory):
- a portal's backlog is never one in-memory value: every held message is its
  own row, so a worker holding millions of messages stays at constant memory;
- a release reads only the held rows' metadata (an index range scan per
  portal), never their bodies, which go to the producer in pages;
- the ``max_initial_conversations`` ranking needs every portal of a sync at
  once, and those live on other partitions/workers: Postgres is the shared view;
- the outbox (commands with their per-portal ``seq``) is written in the same
  transaction that records the release, so a crash can never separate them.

A message row is written once and never updated (see docs/pipeline.md, "The
hold store"); decisions are watermarks, release chunks and a per-portal
produced seq. Rows are keyed so that redelivered records are no-ops:
(portal, message id, part) for messages, the portal key for portals.
pipeline.hold reads and writes the hold, pipeline.outbox the outbox.
"""

from __future__ import annotations

import asyncpg

from pipeline.portal import PortalState

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

# Several workers may start at once: the DDL runs under this advisory lock.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(7460001)"
TABLES_EXIST = "SELECT to_regclass('pipeline_portal') IS NOT NULL"
META_EXISTS = "SELECT to_regclass('pipeline_meta') IS NOT NULL"
READ_VERSION = "SELECT value FROM pipeline_meta WHERE key = 'schema_version'"
WRITE_VERSION = (
    "INSERT INTO pipeline_meta (key, value) VALUES ('schema_version', $1) "
    "ON CONFLICT (key) DO NOTHING"
)


def schema_sql() -> str:
    """SCHEMA with the state names of its partial indexes filled in from PortalState."""
    return SCHEMA.replace("{backfilling}", PortalState.BACKFILLING.value)


async def init_schema(pool: asyncpg.Pool) -> None:
    """Create the tables if missing; refuse a database of another schema version."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SCHEMA_LOCK)
        version = None
        if await conn.fetchval(TABLES_EXIST):
            if await conn.fetchval(META_EXISTS):
                version = await conn.fetchval(READ_VERSION)
            if version != str(SCHEMA_VERSION):
                raise RuntimeError(
                    f"the pipeline tables in this database have schema version "
                    f"{version or 1}, this backflow needs {SCHEMA_VERSION}: point "
                    "database.url at a new database (or drop the pipeline_* tables "
                    "and replay the topics)"
                )
        await conn.execute(schema_sql())
        await conn.execute(WRITE_VERSION, str(SCHEMA_VERSION))

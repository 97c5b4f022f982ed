"""The sink's durable state in Postgres: rooms, ghosts, the message map, intents.

* ``sink_rooms``: portal -> room (the alias is the homeserver-side key).
* ``sink_ghosts``: ghosts registered, with the profile we last set.
* ``sink_messages``: (room, portal, message id, part) -> event id, ts. UNIQUE,
  so a repeated command can never be recorded twice. Keyed by room too: a
  portal rebuilt into a new room gets its messages again there.
* ``sink_rebuilds``: a portal rebuilt into a fresh room (``backflow replay
  --mode rebuild``): its old room, its new one, whether it finished
  (tombstone sent, alias moved). With sink_messages, the map knows both rooms.
* ``sink_intents``: written BEFORE a send, deleted in the same transaction
  that records the result. A row still here after a crash marks a send that
  may or may not have reached the homeserver: it is settled by looking for
  the event in the room before sending again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

SCHEMA = """
CREATE TABLE IF NOT EXISTS sink_rooms (
    portal_key  text PRIMARY KEY,
    network     text NOT NULL,
    portal      text NOT NULL,
    room_id     text NOT NULL,
    alias       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS sink_ghosts (
    user_id       text PRIMARY KEY,
    displayname   text,
    avatar_source text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS sink_messages (
    room_id     text NOT NULL,
    portal_key  text NOT NULL,
    message_id  text NOT NULL,
    part        integer NOT NULL,
    event_id    text NOT NULL,
    sender      text,
    ts          bigint NOT NULL,
    seq         bigserial,
    PRIMARY KEY (room_id, portal_key, message_id, part)
);
CREATE INDEX IF NOT EXISTS sink_messages_room_seq ON sink_messages (room_id, seq);
CREATE TABLE IF NOT EXISTS sink_rebuilds (
    portal_key  text NOT NULL,
    name        text NOT NULL,
    old_room    text NOT NULL,
    new_room    text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (portal_key, name)
);
CREATE TABLE IF NOT EXISTS sink_intents (
    room_id     text NOT NULL,
    portal_key  text NOT NULL,
    message_id  text NOT NULL,
    part        integer NOT NULL,
    txn_id      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, portal_key, message_id, part)
);
"""

# Serialises concurrent schema creation by several sink processes.
_SCHEMA_LOCK = 0x6266_7369_6E6B  # "bfsink"


# A portal's current room (a rebuild points it at the new one).
SAVE_ROOM = """INSERT INTO sink_rooms (portal_key, network, portal, room_id, alias)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (portal_key) DO UPDATE SET room_id = $4, alias = $5"""

class StoreUnreachable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Mapped:
    event_id: str
    ts: int
    sender: str | None


@dataclass(frozen=True, slots=True)
class Intent:
    room_id: str
    portal_key: str
    message_id: str
    part: int
    txn_id: str


class SinkStore:
    """The sink's Postgres state (see the module docstring); one pool per process."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, url: str | None, size: int = 10) -> SinkStore:
        if not url:
            raise StoreUnreachable(
                "no database configured: set database.url (BACKFLOW_DATABASE_URL)"
            )
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=size, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StoreUnreachable(f"cannot reach the database: {exc}") from None
        store = cls(pool)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(SCHEMA)
        return store

    async def close(self) -> None:
        await self.pool.close()

    # ------------------------------------------------------------ rooms

    async def room(self, portal_key: str) -> str | None:
        return await self.pool.fetchval(
            "SELECT room_id FROM sink_rooms WHERE portal_key = $1", portal_key
        )

    async def room_by_alias_or_id(self, value: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM sink_rooms WHERE room_id = $1 OR alias = $1 OR portal_key = $1 "
            "OR portal = $1 LIMIT 1",
            value,
        )

    async def rooms(self, network: str | None = None) -> list[asyncpg.Record]:
        """Every portal room the sink made (of one network), by portal key."""
        return await self.pool.fetch(
            "SELECT * FROM sink_rooms WHERE $1::text IS NULL OR network = $1 ORDER BY portal_key",
            network,
        )

    async def save_room(
        self, portal_key: str, network: str, portal: str, room_id: str, alias: str
    ) -> None:
        await self.pool.execute(
            SAVE_ROOM,
            portal_key,
            network,
            portal,
            room_id,
            alias,
        )

    async def last_bridged_ts(self, room_id: str, portal_key: str) -> int | None:
        return await self.pool.fetchval(
            "SELECT max(ts) FROM sink_messages WHERE room_id = $1 AND portal_key = $2",
            room_id,
            portal_key,
        )

    # ------------------------------------------------------------ rebuilds

    async def rebuild(self, portal_key: str, name: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM sink_rebuilds WHERE portal_key = $1 AND name = $2", portal_key, name
        )

    async def rebuilds(self, portal_key: str) -> list[asyncpg.Record]:
        """The portal's rebuilds, oldest first (the rooms it had before its current one)."""
        return await self.pool.fetch(
            "SELECT * FROM sink_rebuilds WHERE portal_key = $1 ORDER BY started_at, name",
            portal_key,
        )

    async def start_rebuild(self, portal_key: str, name: str, old_room: str) -> None:
        await self.pool.execute(
            """INSERT INTO sink_rebuilds (portal_key, name, old_room) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING""",
            portal_key,
            name,
            old_room,
        )

    async def rebuilt(
        self, portal_key: str, name: str, network: str, portal: str, room_id: str, alias: str
    ) -> None:
        """The rebuild's new room exists: it becomes the portal's room, atomically."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE sink_rebuilds SET new_room = $3 WHERE portal_key = $1 AND name = $2",
                portal_key,
                name,
                room_id,
            )
            await conn.execute(
                SAVE_ROOM,
                portal_key,
                network,
                portal,
                room_id,
                alias,
            )

    async def finish_rebuild(self, portal_key: str, name: str) -> None:
        await self.pool.execute(
            """UPDATE sink_rebuilds SET finished_at = now()
               WHERE portal_key = $1 AND name = $2 AND finished_at IS NULL""",
            portal_key,
            name,
        )

    # ------------------------------------------------------------ ghosts

    async def ghost(self, user_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM sink_ghosts WHERE user_id = $1", user_id)

    async def save_ghost(self, user_id: str, displayname: str | None, avatar: str | None) -> None:
        await self.pool.execute(
            """INSERT INTO sink_ghosts (user_id, displayname, avatar_source) VALUES ($1, $2, $3)
               ON CONFLICT (user_id) DO UPDATE
               SET displayname = $2, avatar_source = $3, updated_at = now()""",
            user_id,
            displayname,
            avatar,
        )

    # ------------------------------------------------------------ messages

    async def lookup(
        self, room_id: str, portal_key: str, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], Mapped]:
        """Mapped events for (message id, part) pairs in one round trip."""
        if not keys:
            return {}
        rows = await self.pool.fetch(
            """SELECT m.message_id, m.part, m.event_id, m.ts, m.sender
               FROM sink_messages m
               JOIN unnest($3::text[], $4::int[]) AS k(message_id, part)
                 ON m.message_id = k.message_id AND m.part = k.part
               WHERE m.room_id = $1 AND m.portal_key = $2""",
            room_id,
            portal_key,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return {
            (r["message_id"], r["part"]): Mapped(r["event_id"], r["ts"], r["sender"]) for r in rows
        }

    async def lookup_message(self, room_id: str, portal_key: str, message_id: str) -> Mapped | None:
        """The event of a message's first part (the one replies and edits point at)."""
        row = await self.pool.fetchrow(
            """SELECT event_id, ts, sender FROM sink_messages
               WHERE room_id = $1 AND portal_key = $2 AND message_id = $3
               ORDER BY part LIMIT 1""",
            room_id,
            portal_key,
            message_id,
        )
        return Mapped(row["event_id"], row["ts"], row["sender"]) if row else None

    async def newest_event(self, room_id: str) -> str | None:
        """The most recently recorded event of a room (settling scans back to it)."""
        return await self.pool.fetchval(
            "SELECT event_id FROM sink_messages WHERE room_id = $1 ORDER BY seq DESC LIMIT 1",
            room_id,
        )

    async def add_intents(self, intents: list[Intent]) -> None:
        if not intents:
            return
        await self.pool.executemany(
            """INSERT INTO sink_intents (room_id, portal_key, message_id, part, txn_id)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            [(i.room_id, i.portal_key, i.message_id, i.part, i.txn_id) for i in intents],
        )

    async def intents(self, room_id: str | None = None) -> list[Intent]:
        rows = await self.pool.fetch(
            """SELECT room_id, portal_key, message_id, part, txn_id FROM sink_intents
               WHERE $1::text IS NULL OR room_id = $1""",
            room_id,
        )
        return [Intent(**dict(r)) for r in rows]

    async def record(self, results: list[tuple[Intent, str, int, str | None]]) -> None:
        """Record sent events (intent, event id, ts, sender) and clear their intents, atomically."""
        if not results:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO sink_messages
                   (room_id, portal_key, message_id, part, event_id, ts, sender)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
                [
                    (i.room_id, i.portal_key, i.message_id, i.part, ev, ts, sender)
                    for i, ev, ts, sender in results
                ],
            )
            await self._clear(conn, [r[0] for r in results])

    async def drop_intents(self, intents: list[Intent]) -> None:
        """Forget intents whose sends failed permanently (they went to dead letters)."""
        if intents:
            async with self.pool.acquire() as conn:
                await self._clear(conn, intents)

    @staticmethod
    async def _clear(conn: Any, intents: list[Intent]) -> None:
        await conn.executemany(
            """DELETE FROM sink_intents
               WHERE room_id = $1 AND portal_key = $2 AND message_id = $3 AND part = $4""",
            [(i.room_id, i.portal_key, i.message_id, i.part) for i in intents],
        )

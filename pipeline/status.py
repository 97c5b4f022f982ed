"""`backflow status`: what the pipeline knows about each portal, from Postgres."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from pipeline.schema import init_schema
from topics.settings import Settings

_QUERY = """
SELECT p.key, p.state, p.room_id, p.history_complete, p.last_bridged_ts, p.last_error,
       p.dropped, p.updated_at,
       (SELECT count(*) FROM pipeline_message m
        WHERE m.portal_key = p.key AND m.arrival > least(p.history_decided, p.live_decided)
          AND m.arrival > CASE WHEN m.live THEN p.live_decided ELSE p.history_decided END)
       + (SELECT count(*) FROM pipeline_holdback h WHERE h.portal_key = p.key) AS held,
       p.next_seq - 1 AS released,
       p.next_seq - 1 - p.produced_seq - cardinality(p.produced_extra) AS pending
FROM pipeline_portal p
WHERE $1::text IS NULL OR p.key = $1 OR p.portal = $1
ORDER BY p.key
"""


async def portal_status(settings: Settings, portal: str | None = None) -> list[dict[str, Any]]:
    """One dict per portal: state, held/released counts, last bridged ts, drops, last error.

    ``portal`` matches the portal key (``network:portal``) or the bare portal id.
    """
    if not settings.database.url:
        raise RuntimeError("no database configured: set BACKFLOW_DATABASE_URL")
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=1)
    try:
        await init_schema(pool)  # status may run before any worker created the tables
        return await status_rows(pool, portal)
    finally:
        await pool.close()


async def status_rows(pool: asyncpg.Pool, portal: str | None = None) -> list[dict[str, Any]]:
    """``portal_status`` on an open pool."""
    rows = await pool.fetch(_QUERY, portal)
    return [
        {
            "portal": r["key"],
            "state": r["state"],
            "room_id": r["room_id"],
            "history_complete": r["history_complete"],
            "held": r["held"],
            "released": r["released"],
            "pending": r["pending"],
            "dropped": json.loads(r["dropped"]) if isinstance(r["dropped"], str) else r["dropped"],
            "last_bridged_ts": r["last_bridged_ts"],
            "last_error": r["last_error"],
            "updated_at": r["updated_at"].isoformat() if r["updated_at"] else None,
        }
        for r in rows
    ]

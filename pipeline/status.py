"""`backflow status`: what the pipeline knows about each portal, from Postgres."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from backflow.settings import Settings
from pipeline.state import init_schema

_QUERY = """
SELECT p.key, p.state, p.room_id, p.history_complete, p.last_bridged_ts, p.last_error,
       p.dropped, p.updated_at,
       count(m.msg_id) FILTER (WHERE m.state = 'held') AS held,
       count(m.msg_id) FILTER (WHERE m.state = 'released') AS released,
       count(m.msg_id) FILTER (WHERE m.state = 'released' AND NOT m.produced) AS pending
FROM pipeline_portal p LEFT JOIN pipeline_message m ON m.portal_key = p.key
WHERE $1::text IS NULL OR p.key = $1 OR p.portal = $1
GROUP BY p.key ORDER BY p.key
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
        rows = await pool.fetch(_QUERY, portal)
    finally:
        await pool.close()
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

"""max_initial_conversations ranks by a portal's last_activity_ts when it is later (mautrix)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.pipeline_support import (
    BASE_TS,
    CommandDriver,
    Worker,
    done,
    info,
    msg,
    pipeline_settings,
    publish,
    sync_done,
    unique,
)


async def test_last_activity_outranks_older_messages(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(
        kafka, pg_admin, tmp_path, **{"backfill.max_initial_conversations": 1}
    )
    portals = [unique(f"chat{i}") for i in range(3)]
    sync = unique("sync")
    records: list[Any] = []
    for i, p in enumerate(portals):  # portal i's newest message is at i minutes ...
        portal = info(p)
        if i == 0:  # ... but the network says chat 0 was active last (its rows were deleted)
            portal = replace(portal, last_activity_ts=BASE_TS + 3_600_000)
        records += [portal, msg(p, "a", BASE_TS + i * 60_000)]
    records += [done(p, sync=sync) for p in portals] + [sync_done(sync, len(portals))]
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        async with CommandDriver(settings) as sink:
            await publish(settings, settings.catalog.history, records)
            await sink.wait_for(lambda: len(sink.creates()) == 1, workers=(worker,))
            assert [c.key for c in sink.creates()] == [f"testnet:{portals[0]}"]
    finally:
        worker.stop()

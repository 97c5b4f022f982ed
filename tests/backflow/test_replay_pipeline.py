"""Replay commands beside a running pipeline worker: real broker, real Postgres.

Replay publishes SendMessage records with seq 0 to the command topic. A
pipeline worker reads that topic back when it takes over a partition and
marks the seqs it finds as produced; this shows, with a real worker, that a
replay command never stands in for one of the pipeline's own: its commands
still come numbered 1, 2, 3 ... and all of them are produced. The test plays
the sink's protocol role (tests/pipeline_support.CommandDriver).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backflow.replay import Selection, replay_catchup
from connectors.matrix.store import SinkStore
from pipeline.status import portal_status
from tests.pipeline_support import (
    BASE_TS,
    CommandDriver,
    Worker,
    done,
    info,
    msg,
    pipeline_settings,
    publish,
    unique,
)


async def test_pipeline_numbering_beside_replay_commands(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    portal = unique("rp")
    key = f"testnet:{portal}"
    t = [BASE_TS + i * 1000 for i in range(4)]
    history = [msg(portal, f"m{i}", t[i]) for i in range(3)]
    await publish(settings, settings.catalog.history, [info(portal), *history])
    # The sink knows an (empty) room for the portal: replay sends it everything.
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        await store.save_room(key, "testnet", portal, f"!{portal}:test", f"#{portal}:test")
    finally:
        await store.close()
    result = await replay_catchup(settings, Selection(portals=(key,)))
    assert [len(p.plan.send) for p in result.portals if p.plan] == [3]

    async with CommandDriver(settings) as sink:
        worker = Worker(settings, tmp_path / "worker.log")
        try:
            await publish(settings, settings.catalog.history, [done(portal)])
            await sink.wait_for(lambda: len(sink.sends(key)) == 6, timeout=90, workers=(worker,))
            await publish(settings, settings.catalog.live, [msg(portal, "m3", t[3], history=False)])
            await sink.wait_for(lambda: len(sink.sends(key)) == 7, timeout=60, workers=(worker,))
        finally:
            worker.stop()
    assert [(s.message.id, s.seq) for s in sink.sends(key)] == [
        ("m0", 0),
        ("m1", 0),
        ("m2", 0),
        ("m0", 1),
        ("m1", 2),
        ("m2", 3),
        ("m3", 4),
    ]
    [status] = await portal_status(settings, key)
    assert status["state"] == "live"

"""The pipeline worker process's /metrics: held, released, produced, lag as records flow."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import asyncpg

from pipeline.schema import init_schema
from tests.helpers import free_port, scrape_until
from tests.pipeline.test_reject import REFUSE_POISON
from tests.pipeline_support import (
    BASE_TS,
    CommandDriver,
    Worker,
    done,
    info,
    msg,
    pipeline_settings,
    publish,
    read_topic,
    sync_done,
    unique,
)


def lag(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("backflow_pipeline_consumer_lag{"))


async def test_worker_metrics_follow_hold_and_release(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(
        kafka, pg_admin, tmp_path, **{"backfill.max_initial_conversations": 1}
    )
    old, new = unique("old"), unique("new")
    sync = unique("sync")
    records: list[Any] = [info(old), msg(old, "a", BASE_TS), msg(old, "b", BASE_TS + 1)]
    records += [info(new), msg(new, "c", BASE_TS + 60_000), msg(new, "d", BASE_TS + 60_001)]
    records += [done(old, sync=sync), done(new, sync=sync), sync_done(sync, 2)]
    port = free_port()
    worker = Worker(
        settings,
        tmp_path / "worker.log",
        BACKFLOW_METRICS_WORKER_PORT=str(port),
        BACKFLOW_LOG_FORMAT="json",
    )
    try:
        async with CommandDriver(settings) as sink:
            up = await scrape_until(port, lambda m: "backflow_pipeline_applied_total" in m)
            assert up["backflow_pipeline_produced_total"] == 0
            await publish(settings, settings.catalog.history, records)
            await sink.wait_for(lambda: len(sink.sends(f"testnet:{new}")) == 2, workers=(worker,))
            # The older portal is held by max_initial_conversations; the newer released.
            held = await scrape_until(
                port,
                lambda m: (
                    m.get("backflow_pipeline_released") == 2
                    and m.get("backflow_pipeline_held") == 2
                    and lag(m) == 0
                ),
            )
            # Every record, and the RoomCreated the sink answered with.
            assert held["backflow_pipeline_applied_total"] == len(records) + 1
            assert held["backflow_pipeline_portals"] == 2
            lags = [k for k in held if k.startswith("backflow_pipeline_consumer_lag{")]
            assert any(f"topic={settings.catalog.history}" in k for k in lags), lags
            # A live message gives the held portal its room: everything is released.
            await publish(
                settings, settings.catalog.live, [msg(old, "e", BASE_TS + 2, history=False)]
            )
            await sink.wait_for(lambda: len(sink.sends(f"testnet:{old}")) == 3, workers=(worker,))
            final = await scrape_until(
                port,
                lambda m: (
                    m.get("backflow_pipeline_released") == 5
                    and m.get("backflow_pipeline_held") == 0
                ),
            )
            commands = await read_topic(settings, settings.catalog.matrix_commands)
            assert final["backflow_pipeline_produced_total"] == len(commands) == 7
            assert final["backflow_pipeline_dead_lettered_total"] == 0
            assert final["backflow_pipeline_applied_total"] == len(records) + 3
    finally:
        worker.stop()
    lines = [json.loads(x) for x in worker.log().splitlines() if x.startswith("{")]
    owns = [x for x in lines if x["msg"].startswith("pipeline owns partitions")]
    assert owns and owns[0]["logger"].startswith("backflow")


async def test_a_taken_metrics_port_stops_the_worker_with_a_clear_error(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = Worker(settings, tmp_path / "worker.log", BACKFLOW_METRICS_WORKER_PORT=str(port))
        try:
            assert worker.proc.wait(60) == 1
        finally:
            worker.stop()
    assert f"error: metrics endpoint 127.0.0.1:{port}" in worker.log()


async def test_a_refused_record_is_counted_and_its_log_line_names_portal_and_message(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=1)
    try:  # the schema first, then a real Postgres refusal for one message id
        await init_schema(pool)
        await pool.execute(REFUSE_POISON)
    finally:
        await pool.close()
    portal = unique("bad")
    port = free_port()
    worker = Worker(
        settings,
        tmp_path / "worker.log",
        BACKFLOW_METRICS_WORKER_PORT=str(port),
        BACKFLOW_LOG_FORMAT="json",
    )
    try:
        await scrape_until(port, lambda m: "backflow_pipeline_applied_total" in m)
        records = [info(portal), msg(portal, "fine", BASE_TS), msg(portal, "poison", BASE_TS + 1)]
        await publish(settings, settings.catalog.history, records)
        m = await scrape_until(port, lambda m: m["backflow_pipeline_dead_lettered_total"] == 1)
        letters = await read_topic(settings, settings.catalog.dead_letters)
        assert len(letters) == m["backflow_pipeline_dead_lettered_total"]
    finally:
        worker.stop()
    lines = [json.loads(x) for x in worker.log().splitlines() if x.startswith("{")]
    failed = [x for x in lines if "failed" in x["msg"] and x.get("message_id") == "poison"]
    assert failed and failed[0]["portal"] == f"testnet:{portal}", lines

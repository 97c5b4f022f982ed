"""The sink under trouble: SIGKILL at random points, a rate-limiting homeserver,
and a Synapse restart in the middle of a backfill (last: it is session-wide).

Each test reads every room back from Synapse and checks: every message exactly
once, in order, with origin_server_ts equal to the source timestamp.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from backflow.stack.synapse import Synapse
from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.runner import run_sink
from connectors.matrix.store import SinkStore
from tests.helpers import REPO
from tests.sink_helpers import (
    BASE_TS,
    NET,
    client_for,
    create,
    publish,
    room_messages,
    sends,
    text,
)
from topics.settings import Settings


def backfill(portals: int, per_portal: int, senders: int = 3) -> dict[str, list]:
    out = {}
    for p in range(portals):
        portal = f"crash-{uuid.uuid4().hex[:8]}-{p}"
        out[portal] = [
            text(portal, f"m{i}", f"user{i % senders}", BASE_TS + i * 1000, f"{portal} #{i}")
            for i in range(per_portal)
        ]
    return out


async def publish_backfill(settings: Settings, data: dict[str, list], senders: int = 3) -> None:
    records = []
    for portal, msgs in data.items():
        members = [(f"user{i}", f"User {i}") for i in range(senders)]
        records += [create(portal, members), *sends(msgs)]
    await publish(settings, records)


async def mapped_count(settings: Settings) -> int:
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        return int(await store.pool.fetchval("SELECT count(*) FROM sink_messages"))
    finally:
        await store.close()


async def check_rooms(settings: Settings, data: dict[str, list]) -> int:
    """Every message exactly once, in order, with its ts; returns the events checked."""
    store = await SinkStore.open(settings.database.url, size=1)
    checked = 0
    try:
        async with client_for(settings) as client:
            for portal, msgs in data.items():
                room = await store.room(f"{NET}:{portal}")
                assert room is not None, portal
                events = [
                    e for e in await room_messages(client, room) if SOURCE_KEY in e["content"]
                ]
                ids = [e["content"][SOURCE_KEY]["id"] for e in events]
                dupes = [i for i, n in Counter(ids).items() if n > 1]
                assert not dupes, f"{portal}: duplicates {dupes}"
                assert ids == [m.id for m in msgs], f"{portal}: lost or reordered"
                assert [e["origin_server_ts"] for e in events] == [m.ts for m in msgs]
                assert await store.intents(room) == []
                checked += len(events)
    finally:
        await store.close()
    return checked


async def in_flight(settings: Settings) -> int:
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        return int(await store.pool.fetchval("SELECT count(*) FROM sink_intents"))
    finally:
        await store.close()


def sink_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFLOW_")}
    env.update(
        {
            "BACKFLOW_KAFKA_BOOTSTRAP": str(settings.kafka.bootstrap),
            "BACKFLOW_KAFKA_TOPIC_PREFIX": settings.kafka.topic_prefix,
            "BACKFLOW_KAFKA_PARTITIONS": str(settings.kafka.partitions),
            "BACKFLOW_DATABASE_URL": str(settings.database.url),
            "BACKFLOW_HOMESERVER_URL": str(settings.homeserver.url),
            "BACKFLOW_HOMESERVER_SERVER_NAME": str(settings.homeserver.server_name),
            "BACKFLOW_APPSERVICE_REGISTRATION": str(settings.appservice.registration),
            "BACKFLOW_STATE_DIR": str(settings.state_dir),
            "BACKFLOW_SINK_MAX_RETRY_DELAY_S": "2",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def start_sink(settings: Settings, log: Path, idle_exit: float | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "connectors.matrix.sink_main"]
    if idle_exit is not None:
        args += ["--idle-exit", str(idle_exit)]
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, env=sink_env(settings), cwd=settings.state_dir, stdout=out, stderr=out
        )


async def test_sigkill_at_random_points(stack: Settings, tmp_path: Path) -> None:
    data = backfill(portals=5, per_portal=60)
    total = sum(len(m) for m in data.values())
    await publish_backfill(stack, data)
    rng = random.Random(os.environ.get("BACKFLOW_TEST_SEED") or time.time_ns())
    log = tmp_path / "sink.log"
    kills = 0
    for _ in range(3):
        if await mapped_count(stack) >= total:
            break
        proc = start_sink(stack, log)
        try:
            # Wait until sends are under way (intents written), then kill at a
            # random moment: before, during or after some sends of a batch.
            deadline = time.monotonic() + 60
            while not await in_flight(stack) and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    proc = start_sink(stack, log, idle_exit=2.0)
    try:
        code = await asyncio.to_thread(proc.wait, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]
    assert kills >= 2
    assert await check_rooms(stack, data) == total
    print(*[line for line in log.read_text().splitlines() if "settled" in line], sep="\n")


async def test_rate_limited_homeserver_keeps_order(limited_stack: Settings) -> None:
    # Synapse's default rc_message (0.2/s, burst 10 per user) throttles every ghost.
    data = backfill(portals=1, per_portal=45, senders=3)
    await publish_backfill(limited_stack, data)
    started = time.monotonic()
    stats = await run_sink(limited_stack, idle_exit=2.0)
    elapsed = time.monotonic() - started
    assert stats.sent == 45 and stats.dead_letters == 0
    assert await check_rooms(limited_stack, data) == 45
    print(f"rate-limited backfill of 45 messages took {elapsed:.1f}s")


async def test_synapse_restart_mid_backfill(stack: Settings, synapse: Synapse) -> None:
    """Last in this file: restarts the session-wide Synapse (and leaves it running)."""
    data = backfill(portals=4, per_portal=80)
    total = sum(len(m) for m in data.values())
    await publish_backfill(stack, data)
    stop = asyncio.Event()
    task = asyncio.create_task(run_sink(stack, stop=stop))
    try:
        deadline = time.monotonic() + 60
        while not await in_flight(stack) and time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # sends under way in every room
        await asyncio.to_thread(synapse.restart)
        deadline = time.monotonic() + 90
        while await mapped_count(stack) < total and time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        stats = await task
        if synapse.pid is None:
            synapse.start()
    assert await check_rooms(stack, data) == total
    assert stats.transient > 0, "the sink should have seen the homeserver go away"
    print(stats.summary())

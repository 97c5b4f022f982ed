"""whatsapp-history --follow: rows captured as they appear, once, across restarts and outages."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from connectors.sources.wa_follow import Follower
from tests.conftest import make_settings, unique
from tests.helpers import read_topic, stage_env
from tests.wa_bridge import (
    ALICE,
    BOB,
    DAVE,
    GROUP,
    T0,
    Bridge,
    insert_postgres,
    insert_sqlite,
    sample,
    web_message,
    write_postgres,
    write_sqlite,
)
from topics.records import NetworkMessage

SAMPLE_MESSAGES = 19  # what sample() yields as messages (reactions included)


@pytest.fixture
async def settings(kafka, pg_admin, tmp_path):
    from backflow.stack.postgres import drop_database

    settings, db = await make_settings(kafka, pg_admin, None, None, tmp_path)
    yield settings
    await drop_database(pg_admin, db)


def new_rows(n: int, start: int, inserted: int | None = None) -> Bridge:
    b = Bridge()
    for i in range(n):
        info = web_message(
            GROUP, f"N{start + i}", T0 + 1000 + start + i, participant=BOB, text=f"new {start + i}"
        )
        b.add(GROUP, info, inserted=inserted or int(time.time()))
    return b


async def message_ids(settings) -> Counter[str]:
    records = await read_topic(settings, settings.catalog.history)
    return Counter(r.id for r in records if isinstance(r, NetworkMessage))


async def wait_for(settings, want: set[str], timeout: float = 30) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = await message_ids(settings)
        if want <= set(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.3)


async def test_follow_captures_new_rows_once_and_resumes(settings, tmp_path: Path) -> None:
    db = write_sqlite(tmp_path / "wa.db", sample())
    lines: list[str] = []
    follower = Follower(str(db), {}, settings, lines.append, interval=0)
    assert await follower.round() == 16  # the rows already there: a full import
    first = await message_ids(settings)
    assert sum(first.values()) == SAMPLE_MESSAGES
    assert await follower.round() == 0  # nothing new: nothing published
    insert_sqlite(db, new_rows(3, 0))
    assert await follower.round() == 3
    got = await message_ids(settings)
    assert [n for n, c in got.items() if c > 1] == []
    assert sum(got.values()) == SAMPLE_MESSAGES + 3
    assert lines[-1].startswith("captured 3 history-sync rows: 3 messages in 1 chats, 0 rejected")
    follower.close()
    # A restart (a new process) reads the saved position: no duplicates.
    insert_sqlite(db, new_rows(2, 3))
    again = Follower(str(db), {}, settings, lines.append, interval=0)
    assert again.position is not None and again.position.inserted_time > 0
    assert await again.round() == 2
    # A row committed late with an inserted_time inside the overlap window is no gap.
    late = int(again.position.inserted_time) - 5
    insert_sqlite(db, new_rows(1, 5, inserted=late))
    assert await again.round() == 1
    again.close()
    got = await message_ids(settings)
    assert [n for n, c in got.items() if c > 1] == []
    assert sum(got.values()) == SAMPLE_MESSAGES + 6
    # The bridge deletes what it backfilled: the log still has all of it.
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM whatsapp_history_sync_message")
    conn.close()
    assert sum((await message_ids(settings)).values()) == SAMPLE_MESSAGES + 6


async def test_follow_survives_the_database_going_away(settings, pg_admin) -> None:
    from backflow.stack.postgres import create_database, drop_database

    name = unique("wa_follow_")
    url = await create_database(pg_admin, name)
    lines: list[str] = []
    try:
        write_postgres(url, sample())
        follower = Follower(url, {}, settings, lines.append, interval=0.2)
        runner = asyncio.create_task(follower.run())
        base = {f"{ALICE}:{ALICE}:A1"}
        assert base <= set(await wait_for(settings, base))
        # The bridge's database drops our connection (a restart, a failover).
        admin = await asyncpg.connect(pg_admin)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
        finally:
            await admin.close()
        insert_postgres(url, new_rows(4, 0))
        want = {f"{GROUP}:{BOB}:N{i}" for i in range(4)}
        got = await wait_for(settings, want)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert want <= set(got), lines
        assert [n for n, c in got.items() if c > 1] == []
        assert any("unavailable" in line and "retrying" in line for line in lines), lines
    finally:
        await drop_database(pg_admin, name)


def test_follow_from_the_cli(settings, tmp_path: Path) -> None:
    db = write_sqlite(tmp_path / "wa.db", sample())
    cmd = [
        sys.executable,
        "-m",
        "backflow.cli",
        "import",
        "whatsapp-history",
        str(db),
        "--follow",
        "-o",
        "interval=0.3",
    ]
    env = stage_env(settings)

    def run_until(want: set[str]) -> str:
        child = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            got = asyncio.run(wait_for(settings, want, timeout=60))
            assert want <= set(got)
        finally:
            child.send_signal(signal.SIGINT)
            out, _ = child.communicate(timeout=30)
        return out

    out = run_until({f"{ALICE}:{ALICE}:A1"})
    assert "following" in out and "captured 16 history-sync rows" in out, out
    insert_sqlite(db, new_rows(2, 0))
    out = run_until({f"{GROUP}:{BOB}:N0", f"{GROUP}:{BOB}:N1"})
    assert "from its saved position" in out and "captured 2 history-sync rows" in out, out
    got = asyncio.run(message_ids(settings))
    assert [n for n, c in got.items() if c > 1] == []


async def test_follow_refuses_a_legacy_database_before_publishing(settings, tmp_path: Path) -> None:
    from connectors.source import SourceError

    db = write_sqlite(tmp_path / "legacy.db", sample(), schema="legacy")
    follower = Follower(str(db), {}, settings, print, interval=0)
    with pytest.raises(SourceError, match="--follow needs the bridgev2 schema"):
        await follower.round()
    assert await message_ids(settings) == Counter()


async def test_cli_takes_a_postgres_url(settings, pg_admin) -> None:
    from backflow.stack.postgres import create_database, drop_database
    from tests.helpers import backflow_cli

    name = unique("wa_cli_")
    url = await create_database(pg_admin, name)
    try:
        write_postgres(url, sample())
        result = await asyncio.to_thread(
            backflow_cli, settings, "import", "whatsapp-history", url, "-o", "login=15550000001"
        )
        assert result.returncode == 0, result.stderr
        assert "13 messages, 4 reactions, 1 edits, 1 redactions in 3 portals" in result.stdout
        assert sum((await message_ids(settings)).values()) == SAMPLE_MESSAGES
    finally:
        await drop_database(pg_admin, name)


async def test_markers_wait_for_quiet_and_rank_one_sync(settings, tmp_path: Path) -> None:
    """Chats captured over several rounds are completed together, once, after dispatch_wait."""
    from topics.records import HistoryComplete, SyncComplete

    async def markers() -> tuple[list, list]:
        records = await read_topic(settings, settings.catalog.history)
        return (
            [r for r in records if isinstance(r, HistoryComplete)],
            [r for r in records if isinstance(r, SyncComplete)],
        )

    db = write_sqlite(tmp_path / "wa.db", sample())
    follower = Follower(str(db), {}, settings, print, interval=0, dispatch_wait=0.5)
    assert await follower.round() == 16
    insert_sqlite(db, new_rows(2, 0))
    assert await follower.round() == 2
    assert await follower.complete() == 0  # not quiet long enough yet
    assert await markers() == ([], [])
    follower.close()
    # A restart keeps what awaits its markers.
    again = Follower(str(db), {}, settings, print, interval=0, dispatch_wait=0.5)
    assert set(again.pending) == {("whatsapp", ALICE), ("whatsapp", GROUP), ("whatsapp", DAVE)}
    await asyncio.sleep(0.6)
    assert await again.step() == 0 and again.pending == {}
    done, syncs = await markers()
    assert sorted(m.portal for m in done) == sorted([ALICE, GROUP, DAVE])
    assert {m.sync for m in done} == {syncs[0].sync} and len(syncs) == 1
    assert syncs[0].portals == 3
    counts = {m.portal: m.count for m in done}
    assert counts[GROUP] == 10 + 2  # 7 messages and 3 reactions, then 2 new rows
    again.close()

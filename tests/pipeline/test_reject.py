"""``Runtime._reject``: a record Postgres refuses for a reason other than U+0000.

The intake refuses U+0000 before Postgres sees it (test_pipeline.py); these
records pass the codec and the intake and are refused by the database itself.
The runtime runs in-process against the real broker and Postgres: its batch
fails, the record-by-record fallback isolates the bad one, which is
dead-lettered with the database's reason and its topic/partition/offset, and
its neighbours (same batch, same partition, other portals) are applied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import pytest

from pipeline.runtime import Runtime
from tests.helpers import read_topic
from tests.pipeline_support import BASE_TS, info, msg, pipeline_settings, unique
from topics.codec import encode
from topics.records import DeadLetter, Record
from topics.settings import Settings

# A real Postgres refusal, permanent (SQLSTATE P0001), for one message id.
# (The natural ones: U+0000 in ids or names, parts over int4, are refused
# by the codec now, where an import knows the line; see tests/hostile.)
REFUSE_POISON = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.msg_id = 'poison' THEN
        RAISE EXCEPTION 'value out of range for the test';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON pipeline_message
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


class Fetched(NamedTuple):
    """A record as the intake gets it from faust: topic, partition, offset, key, value."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


@pytest.fixture
async def runtime(kafka: Any, pg_admin: str, tmp_path: Path) -> AsyncIterator[Runtime]:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    rt = Runtime(settings)
    await rt.start()
    assert rt.pool is not None
    await rt.pool.execute(REFUSE_POISON)
    yield rt
    await rt.stop()


def batch(settings: Settings, records: list[Record], first: int = 0) -> list[Fetched]:
    topic = settings.catalog.history
    return [Fetched(topic, 0, first + i, r.key.encode(), encode(r)) for i, r in enumerate(records)]


async def stored_ids(pool: asyncpg.Pool, key: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT msg_id FROM pipeline_message WHERE portal_key = $1 ORDER BY arrival", key
    )
    return [r["msg_id"] for r in rows]


async def letters_for(settings: Settings, key: str, expect: int) -> list[DeadLetter]:
    letters = await read_topic(settings, settings.catalog.dead_letters, expect=expect)
    return [d for d in letters if isinstance(d, DeadLetter) and d.key == key]


async def test_record_the_database_refuses_is_dead_lettered_and_neighbours_apply(
    runtime: Runtime,
) -> None:
    settings = runtime.settings
    bad, good = unique("bad"), unique("good")
    # The bad portal exists already, so `backflow status` can show its error.
    await runtime.apply(runtime.prepare(batch(settings, [info(bad)])))
    records: list[Record] = [
        msg(good, "g1", BASE_TS),
        msg(bad, "b1", BASE_TS),
        msg(bad, "poison", BASE_TS + 1),
        msg(good, "g2", BASE_TS + 2),
        msg(bad, "b2", BASE_TS + 3),
    ]
    await runtime.apply(runtime.prepare(batch(settings, records, first=1)))

    assert runtime.pool is not None
    assert await stored_ids(runtime.pool, f"testnet:{good}") == ["g1", "g2"]
    assert await stored_ids(runtime.pool, f"testnet:{bad}") == ["b1", "b2"]
    (letter,) = await letters_for(settings, f"testnet:{bad}", expect=1)
    assert letter.stage == "pipeline"
    assert letter.source == f"{settings.catalog.history}[0]@3"  # the poison's own offset
    assert "processing failed" in letter.reason and "out of range for the test" in letter.reason
    assert '"poison"' in letter.original
    assert runtime.stats["dead_letters"] == 1
    error = await runtime.pool.fetchval(
        "SELECT last_error FROM pipeline_portal WHERE key = $1", f"testnet:{bad}"
    )
    assert error is not None and "out of range for the test" in error


async def test_bookkeeping_failing_too_still_dead_letters_and_goes_on(runtime: Runtime) -> None:
    """Recording the portal's error fails as well (here: a trigger refuses it).

    Issue 10 item 1 was exactly this: the bookkeeping raised outside any
    guard, the agent crashed and the partition stalled. Now ``_reject`` logs
    it and returns; the next batch applies.
    """
    settings = runtime.settings
    assert runtime.pool is not None
    await runtime.pool.execute(
        """
        CREATE FUNCTION refuse_errors() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.last_error IS NOT NULL THEN
                RAISE EXCEPTION 'last_error refused by the test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_errors BEFORE UPDATE ON pipeline_portal
            FOR EACH ROW EXECUTE FUNCTION refuse_errors();
        """
    )
    bad, later = unique("bad"), unique("later")
    await runtime.apply(runtime.prepare(batch(settings, [info(bad)])))
    poison = msg(bad, "poison", BASE_TS)
    await runtime.apply(runtime.prepare(batch(settings, [poison, msg(bad, "b1", BASE_TS)], 1)))
    await runtime.apply(runtime.prepare(batch(settings, [msg(later, "l1", BASE_TS)], 3)))

    assert await stored_ids(runtime.pool, f"testnet:{bad}") == ["b1"]
    assert await stored_ids(runtime.pool, f"testnet:{later}") == ["l1"]
    (letter,) = await letters_for(settings, f"testnet:{bad}", expect=1)
    assert "out of range for the test" in letter.reason
    error = await runtime.pool.fetchval(
        "SELECT last_error FROM pipeline_portal WHERE key = $1", f"testnet:{bad}"
    )
    assert error is None  # the trigger refused it; nothing else broke

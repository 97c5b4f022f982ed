"""The hold store and outbox (pipeline.hold, pipeline.outbox) on a real Postgres, without a broker.

The end-to-end tests (test_pipeline*.py) drive the store through workers; these
drive it directly, for the paths a broker run seldom takes: a live dependent
held back behind held history, a gap in the command log, schema versions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable

import asyncpg
import orjson
import pytest

from backflow.stack.postgres import create_database
from pipeline import portal as policy
from pipeline.hold import HoldStore
from pipeline.intake import Incoming
from pipeline.outbox import Outbox
from pipeline.schema import init_schema
from pipeline.status import status_rows
from tests.conftest import CREATED_DATABASES
from tests.pipeline_support import BASE_TS, done, msg, unique
from topics.records import RoomCreated
from topics.settings import BackfillSettings


@pytest.fixture
async def pool(pg_admin: str) -> AsyncIterator[asyncpg.Pool]:
    name = f"bf_store_{uuid.uuid4().hex[:10]}"
    CREATED_DATABASES.append(name)
    url = await create_database(pg_admin, name)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    await init_schema(pool)
    yield pool
    await pool.close()


class Feed:
    """Applies records as a worker would: topic offsets counted per topic."""

    def __init__(self, store: HoldStore) -> None:
        self.store = store
        self.offsets: dict[str, int] = {}

    async def __call__(self, topic: str, *records: object) -> None:
        await self.mixed(*((topic, record) for record in records))

    async def mixed(self, *records: tuple[str, object]) -> None:
        """One batch of records from several topics, in this order."""
        batch = []
        for topic, record in records:
            offset = self.offsets.get(topic, 0)
            self.offsets[topic] = offset + 1
            batch.append(Incoming(record, topic, 0, offset))
        await self.store.apply(batch)


def stores(pool: asyncpg.Pool, **backfill: int) -> tuple[Outbox, Feed]:
    """The outbox, and a feed applying batches to the hold store."""
    hold = HoldStore(pool, BackfillSettings(**backfill))  # type: ignore[arg-type]
    return Outbox(pool), Feed(hold)


async def outbox(store: Outbox) -> list[tuple[str, int, str]]:
    """Every command not yet in the log: (portal, seq, message id), in order."""
    out = []
    portals = await store.outbox_portals([0])
    if portals:
        for portal, seq, record in await store.outbox_page(portals, 10_000):
            out.append((portal.key, seq, orjson.loads(record)["id"]))
    return out


async def produce_all(store: Outbox) -> list[tuple[str, int, str]]:
    sent = await outbox(store)
    sends: dict[str, list[int]] = {}
    for key, seq, _ in sent:
        sends.setdefault(key, []).append(seq)
    await store.mark_produced([], sends, {})
    return sent


def ids(sent: Iterable[tuple[str, int, str]]) -> list[str]:
    return [mid for _, _, mid in sent]


async def test_live_reaction_to_held_history_waits_for_the_catch_up(pool: asyncpg.Pool) -> None:
    store, feed = stores(pool)
    portal = unique("hb")
    key = f"testnet:{portal}"
    room = RoomCreated(network="testnet", portal=portal, room_id="!r:test")
    # The room exists with one message; the portal is live.
    await feed("live", msg(portal, "a", BASE_TS, history=False))
    await feed("events", room)
    assert ids(await produce_all(store)) == ["a"]
    # Older and newer history arrives (held until its HistoryComplete);
    # meanwhile live reactions to two of those history messages, and a plain
    # live message.
    await feed(
        "history",
        msg(portal, "h1", BASE_TS + 10),
        msg(portal, "h2", BASE_TS + 20),
        msg(portal, "h3", BASE_TS + 45),
    )
    await feed(
        "live",
        msg(portal, "b", BASE_TS + 40, history=False),
        msg(portal, "r1", BASE_TS + 50, history=False, kind="reaction", target="h1"),
        msg(portal, "r2", BASE_TS + 60, history=False, kind="reaction", target="h3"),
    )
    # "b" is forwarded at once; the reactions wait behind their held targets.
    assert ids(await produce_all(store)) == ["b"]
    rows = {r["portal"]: r for r in await status_rows(pool)}
    assert rows[key]["held"] == 5  # h1, h2, h3 and the two held-back reactions
    # Catch-up after the last bridged message ("b" at +40): h1/h2 are older, so
    # discarded as before_last_bridged (taken as in the room); h3 goes out and
    # both reactions follow in timestamp order, each after its target.
    await feed("history", done(portal))
    assert ids(await produce_all(store)) == ["h3", "r1", "r2"]
    rows = {r["portal"]: r for r in await status_rows(pool)}
    assert rows[key]["held"] == 0
    assert rows[key]["released"] == 5 and rows[key]["pending"] == 0
    assert rows[key]["dropped"] == {policy.BEFORE_LAST_BRIDGED: 2}
    assert rows[key]["state"] == "live"


async def test_held_history_is_not_decided_by_forwarded_live_messages(
    pool: asyncpg.Pool,
) -> None:
    store, feed = stores(pool)
    portal = unique("mix")
    room = RoomCreated(network="testnet", portal=portal, room_id="!r:test")
    await feed("events", room)
    # History newer than anything bridged, interleaved with live forwards.
    await feed("history", msg(portal, "h1", BASE_TS + 10))
    await feed("live", msg(portal, "l1", BASE_TS + 15, history=False))
    await feed("history", msg(portal, "h2", BASE_TS + 20))
    await feed("live", msg(portal, "l2", BASE_TS + 25, history=False))
    assert ids(await produce_all(store)) == ["l1", "l2"]
    await feed("history", done(portal))
    # Catch-up after l2 (the last bridged): h1/h2 are older, so discarded.
    assert ids(await produce_all(store)) == []
    await feed("history", msg(portal, "h3", BASE_TS + 30), done(portal))
    assert ids(await produce_all(store)) == ["h3"]


async def test_one_batch_acts_as_its_records_one_by_one(pool: asyncpg.Pool) -> None:
    """A release in the middle of a batch sees only what arrived before it."""
    store, feed = stores(pool)
    a, b = unique("one"), unique("two")
    room_a = RoomCreated(network="testnet", portal=a, room_id="!a:test")
    room_b = RoomCreated(network="testnet", portal=b, room_id="!b:test")
    await feed.mixed(
        ("history", msg(a, "a1", BASE_TS + 10)),
        ("history", msg(b, "b1", BASE_TS + 10)),
        ("history", msg(a, "a2", BASE_TS + 20)),
        ("history", done(a)),
        ("events", room_a),
        # After a's release: forwarded after it even though it is older.
        ("live", msg(a, "live1", BASE_TS + 15, history=False)),
        # History after the release waits for its own HistoryComplete.
        ("history", msg(a, "a3", BASE_TS + 30)),
        ("live", msg(a, "r1", BASE_TS + 40, history=False, kind="reaction", target="a3")),
        ("events", room_b),  # b's history is not complete: released all the same
        ("live", msg(b, "b2", BASE_TS + 20, history=False)),
    )
    sent = await produce_all(store)
    assert [(k.split(":")[1], seq, mid) for k, seq, mid in sent] == [
        (a, 1, "a1"),
        (a, 2, "a2"),
        (a, 3, "live1"),
        (b, 1, "b1"),
        (b, 2, "b2"),
    ]
    rows = {r["portal"]: r for r in await status_rows(pool)}
    assert rows[f"testnet:{a}"]["held"] == 2  # a3 and the reaction held back behind it
    # a3's HistoryComplete: catch-up after a2 (+20, the newest bridged); a3 (+30) is newer.
    await feed("history", done(a))
    assert ids(await produce_all(store)) == ["a3", "r1"]


async def test_a_gap_in_the_log_is_filled_without_producing_anything_twice(
    pool: asyncpg.Pool,
) -> None:
    store, feed = stores(pool)
    portal = unique("gap")
    key = f"testnet:{portal}"
    history = [msg(portal, f"m{i}", BASE_TS + i) for i in range(6)]
    await feed("history", *history, done(portal))
    await feed("events", RoomCreated(network="testnet", portal=portal, room_id="!r:test"))
    assert [seq for _, seq, _ in await outbox(store)] == [1, 2, 3, 4, 5, 6]
    # A failed produce: seqs 1-2 and 5 reached the log, 3-4 did not (the
    # read-back of the log finds exactly these).
    await store.mark_produced([], {key: [1, 2, 5]}, {})
    assert [(seq, mid) for _, seq, mid in await outbox(store)] == [
        (3, "m2"),
        (4, "m3"),
        (6, "m5"),
    ]
    assert (await status_rows(pool))[0]["pending"] == 3
    await store.mark_produced([], {key: [3, 4, 6]}, {})
    assert await outbox(store) == []
    row = (await status_rows(pool))[0]
    assert row["pending"] == 0 and row["state"] == "live"


async def test_redelivered_batch_changes_nothing(pool: asyncpg.Pool) -> None:
    store, feed = stores(pool, max_initial_messages=2)
    portal = unique("redo")
    history = [msg(portal, f"m{i}", BASE_TS + i) for i in range(4)]
    await feed("history", *history, done(portal))
    room = RoomCreated(network="testnet", portal=portal, room_id="!r:test")
    await feed("events", room)
    first = await outbox(store)
    # The same records again (a worker crashed before its offsets were committed).
    await Feed(feed.store)("history", *history, done(portal))
    await Feed(feed.store)("events", room)
    assert await outbox(store) == first
    assert ids(first) == ["m2", "m3"]
    row = (await status_rows(pool))[0]
    assert row["held"] == 0 and row["released"] == 2
    assert row["dropped"] == {policy.CAP: 2}


async def test_a_database_with_another_schema_version_is_refused(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE pipeline_meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema version 1, this backflow needs"):
        await init_schema(pool)

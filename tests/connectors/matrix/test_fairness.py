"""Fairness inside one partition (connectors/matrix/reread.py), against the real stack.

A big portal's block comes first in a partition, a small portal's after it. The
small room must not wait for the big one: it is complete, read back from
Synapse, while the big room still has most of its history to go; and both end
up with every message once, in order.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import TopicPartition

from connectors import sink_runtime
from connectors.matrix import sink as sink_module
from connectors.matrix.reread import Parked, commit_position
from connectors.matrix.runner import run_sink
from connectors.matrix.store import SinkStore
from tests.sink_helpers import BASE_TS, NET, bodies, client_for, create, room_messages, sends, text
from topics import bus
from topics.codec import encode
from topics.records import Record
from topics.settings import Settings


def test_commit_position_never_passes_a_parked_floor() -> None:
    # nothing parked below: the main tracker's position stands
    assert commit_position(40, None, []) == 40
    # a parked portal's first unread command holds the partition back
    assert commit_position(40, None, [12]) == 12
    # ... and so does the main consumer's first unfinished command
    assert commit_position(40, 7, [12]) == 7
    assert commit_position(None, 30, [12, 25]) == 12
    assert commit_position(None, None, []) is None


def test_parked_floor_is_the_first_command_it_still_needs() -> None:
    tp = TopicPartition("t", 0)
    parked = Parked("net:big", tp, next_offset=50)
    assert parked.floor() == 50  # nothing handed over yet: everything from 50 on
    parked.tracker.add(tp, 50)
    parked.tracker.add(tp, 53)
    parked.next_offset = 54
    assert parked.floor() == 50
    parked.tracker.done(tp, 50)
    assert parked.floor() == 53
    parked.active = False  # caught up with the main consumer
    assert parked.floor() == 53
    parked.tracker.done(tp, 53)
    assert parked.floor() is None  # needs nothing: it may be dropped


async def _publish_in_one_partition(settings: Settings, records: list[Record]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        topic = settings.catalog.matrix_commands
        futures = [
            await producer.send(topic, encode(r), key=r.key.encode(), partition=0)  # type: ignore[union-attr]
            for r in records
        ]
        for f in futures:
            await f
    finally:
        await producer.stop()


async def _room(settings: Settings, portal: str) -> str | None:
    store = await SinkStore.open(settings.database.url)
    try:
        return await store.room(f"{NET}:{portal}")
    finally:
        await store.close()


async def test_small_portal_behind_a_big_one_in_its_partition_is_not_kept_waiting(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "ROOM_BUFFER", 20)
    # Small fetches, so that the big block spans many (as a real backfill does).
    monkeypatch.setattr(sink_runtime, "FETCH_RECORDS", 20)
    big, small = f"Big/{uuid.uuid4().hex[:6]}", f"Small/{uuid.uuid4().hex[:6]}"
    big_msgs = [text(big, f"b{i}", "bea", BASE_TS + i, f"big {i}") for i in range(200)]
    small_msgs = [text(small, f"s{i}", "sam", BASE_TS + i, f"small {i}") for i in range(10)]
    await _publish_in_one_partition(
        stack,
        [create(big, [("bea", "Bea")]), *sends(big_msgs), create(small), *sends(small_msgs)],
    )
    settings = stack.with_overrides({"sink.max_rooms_in_flight": 2})
    run = asyncio.create_task(run_sink(settings, idle_exit=3.0))
    big_when_small_done: int | None = None
    async with client_for(stack) as client:
        deadline = asyncio.get_running_loop().time() + 240
        while big_when_small_done is None:
            assert asyncio.get_running_loop().time() < deadline, "small room never completed"
            assert not run.done(), run
            small_room = await _room(stack, small)
            if small_room is not None:
                if len(bodies(await room_messages(client, small_room))) == 10:
                    big_room = await _room(stack, big)
                    assert big_room is not None
                    big_when_small_done = len(bodies(await room_messages(client, big_room)))
            await asyncio.sleep(0.3)
        stats = await asyncio.wait_for(run, timeout=300)
        # Paused behind the big block, the small room would wait for ~180 sends.
        assert big_when_small_done < 100, big_when_small_done
        big_room, small_room = await _room(stack, big), await _room(stack, small)
        assert big_room and small_room
        assert bodies(await room_messages(client, big_room)) == [f"big {i}" for i in range(200)]
        assert bodies(await room_messages(client, small_room)) == [f"small {i}" for i in range(10)]
    assert stats.sent == 210 and stats.dead_letters == 0, stats


async def test_parked_portal_is_committed_no_further_than_its_first_unread_command(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while a portal is parked, the sink commits only up to its floor:
    a second run delivers the rest, once (the map skips what was sent)."""
    monkeypatch.setattr(sink_module, "ROOM_BUFFER", 10)
    portal = f"Park/{uuid.uuid4().hex[:6]}"
    msgs = [text(portal, f"p{i}", "pia", BASE_TS + i, f"parked {i}") for i in range(80)]
    await _publish_in_one_partition(stack, [create(portal, [("pia", "Pia")]), *sends(msgs)])
    stop = asyncio.Event()
    first = asyncio.create_task(run_sink(stack, stop=stop))
    async with client_for(stack) as client:
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            room = await _room(stack, portal)
            if room is not None and len(bodies(await room_messages(client, room))) >= 15:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(first, timeout=120)
        partly = len(bodies(await room_messages(client, room)))
        assert partly < 80  # stopped mid-way: the rest must come from the log again
        await asyncio.wait_for(run_sink(stack, idle_exit=3.0), timeout=300)
        assert bodies(await room_messages(client, room)) == [f"parked {i}" for i in range(80)]

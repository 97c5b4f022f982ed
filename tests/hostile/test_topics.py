"""The record corpus produced straight onto the history and live topics, read by a real worker.

Every bad value is keyed like the neighbour portal, so it lands on the same
partition in between the neighbour's messages. The worker must dead-letter
each (one letter, its topic[partition]@offset, the field in the reason) and
release every neighbour exactly once, in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.hostile.corpus import REJECTED, neighbour_ids, with_neighbours
from tests.pipeline_support import (
    BASE_TS,
    CommandDriver,
    Worker,
    done,
    msg,
    pipeline_settings,
    publish,
    read_topic,
    unique,
)
from topics.records import Content


async def test_worker_dead_letters_the_corpus_and_releases_the_neighbours(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    portal = unique("nb")
    key = f"hostile:{portal}"
    raw = [(key, value) for value, _ in with_neighbours(REJECTED, portal)]
    live = [(key, value) for value, case in with_neighbours(REJECTED[:20], portal) if case]
    await publish(settings, settings.catalog.history, [*raw, done(portal, network="hostile")])
    await publish(settings, settings.catalog.live, live)
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        async with CommandDriver(settings) as sink:
            want = neighbour_ids(REJECTED)
            await sink.wait_for(lambda: sink.sent_ids(key) == want, 120, workers=(worker,))
            letters = [v for _, v in await read_topic(settings, settings.catalog.dead_letters)]
            assert sink.sent_ids(key) == want  # nothing more came after
    finally:
        worker.stop()
    mine = [d for d in letters if d.get("key") == key]
    assert len(mine) == len(REJECTED) + 20, len(mine)
    assert all(d["stage"] == "pipeline" for d in mine)
    sources = {d["source"] for d in mine}
    assert len(sources) == len(mine)  # one letter per record, each with its own offset
    history = [d for d in mine if d["source"].startswith(settings.catalog.history)]
    for letter, case in zip(history, REJECTED, strict=True):
        assert case.reason in letter["reason"], (case.name, letter["reason"])
        if case.field:
            assert f"field '{case.field}'" in letter["reason"], (case.name, letter["reason"])


async def test_duplicate_ids_with_different_content_keep_the_first(
    kafka: Any, pg_admin: str, tmp_path: Path
) -> None:
    """The documented rule (docs/reliability.md): the first to reach the pipeline wins."""
    settings = await pipeline_settings(kafka, pg_admin, tmp_path)
    portal = unique("dup")
    key = f"testnet:{portal}"
    first = msg(portal, "m1", BASE_TS)
    second = replace(first, content=Content(kind="text", body="a different body"))
    later = replace(first, ts=BASE_TS + 5, content=Content(kind="text", body="later still"))
    await publish(settings, settings.catalog.history, [first, second, done(portal)])
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        async with CommandDriver(settings) as sink:
            await sink.wait_for(lambda: len(sink.sends(key)) >= 1, 120, workers=(worker,))
            # Topics are read concurrently: "first" is by arrival, so the live
            # duplicate goes out only once the history one was released.
            # A new live message behind it on the same partition: once that
            # one is sent, the duplicate before it has been processed.
            sentinel = msg(portal, "m2", BASE_TS + 9, history=False)
            await publish(
                settings, settings.catalog.live, [replace(later, history=False), sentinel]
            )
            await sink.wait_for(lambda: "m2" in sink.sent_ids(key), 60, workers=(worker,))
            await asyncio.sleep(1)
            sent = sink.sends(key)
    finally:
        worker.stop()
    bodies = [(s.message.id, s.message.content.body) for s in sent]
    assert bodies == [("m1", first.content.body), ("m2", sentinel.content.body)]

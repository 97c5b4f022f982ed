"""The portal pipeline end to end: real broker, real Postgres, workers as subprocesses.

Worker starts are expensive on the mock broker (a consumer group join waits a
session timeout), so scenarios share one worker where isolation allows: each
uses its own portal ids.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

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
    read_topic,
    unique,
)
from topics.codec import encode
from topics.records import RoomCreated
from topics.settings import Settings


@pytest.fixture(scope="module")
async def shared(
    kafka: Any, pg_admin: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Settings, Worker, CommandDriver]]:
    """One worker with caps (initial 20, catch-up 4) and a sink answering CreateRoom."""
    tmp = tmp_path_factory.mktemp("pipeline")
    settings = await pipeline_settings(
        kafka,
        pg_admin,
        tmp,
        **{"backfill.max_initial_messages": 20, "backfill.max_catchup_messages": 4},
    )
    worker = Worker(settings, tmp / "worker.log")
    async with CommandDriver(settings) as sink:
        yield settings, worker, sink
    worker.stop()


async def test_shuffled_history_released_in_order(shared: tuple[Settings, Worker, CommandDriver]):
    settings, worker, sink = shared
    portal = unique("order")
    key = f"testnet:{portal}"
    # 20 messages (the cap), some sharing a timestamp: ties keep publish order.
    msgs = [msg(portal, f"m{i:02d}", BASE_TS + (i // 3) * 1000) for i in range(20)]
    shuffled = msgs[:]
    random.Random(7).shuffle(shuffled)
    await publish(settings, settings.catalog.history, [info(portal), *shuffled, done(portal)])
    await sink.wait_for(lambda: len(sink.sends(key)) == 20, workers=(worker,))
    expected = sorted(shuffled, key=lambda m: (m.ts, shuffled.index(m)))
    assert sink.sent_ids(key) == [m.id for m in expected]
    assert [s.seq for s in sink.sends(key)] == list(range(1, 21))
    creates = sink.creates(key)
    assert len(creates) == 1 and creates[0].name == f"Chat {portal}"


async def status_of(settings: Settings, key: str) -> dict[str, Any]:
    rows = await portal_status(settings, key)
    assert len(rows) == 1
    return rows[0]


async def test_caps_and_dependents(shared: tuple[Settings, Worker, CommandDriver]):
    settings, worker, sink = shared
    portal = unique("cap")
    key = f"testnet:{portal}"
    history = [msg(portal, f"m{i:02d}", BASE_TS + i * 1000) for i in range(30)]
    history += [
        # reaction first in the input and older than its target (clock skew)
        msg(portal, "r-new", BASE_TS - 5000, kind="reaction", target="m25"),
        msg(portal, "r-old", BASE_TS + 60_000, kind="reaction", target="m02"),  # target cut
        msg(portal, "r-gone", BASE_TS + 61_000, kind="reaction", target="nope"),  # never came
        msg(portal, "e-new", BASE_TS + 62_000, kind="edit", target="m29"),
    ]
    history.insert(0, history.pop(30))  # r-new before everything
    await publish(settings, settings.catalog.history, [*history, done(portal)])
    await sink.wait_for(lambda: len(sink.sends(key)) == 22, workers=(worker,))
    sent = sink.sent_ids(key)
    mains = [f"m{i:02d}" for i in range(10, 30)]
    assert [i for i in sent if i.startswith("m")] == mains  # newest 20, oldest first
    assert sent.index("r-new") == sent.index("m25") + 1
    assert sent[-1] == "e-new"
    st = await status_of(settings, key)
    assert st["state"] == "live" and st["released"] == 22 and st["held"] == 0
    assert st["dropped"] == {"cap": 10, "target_cut": 1, "target_missing": 1}
    assert len(sink.creates(key)) == 1


async def test_catch_up_into_existing_room(shared: tuple[Settings, Worker, CommandDriver]):
    settings, worker, sink = shared
    portal = unique("catch")
    key = f"testnet:{portal}"
    t = [BASE_TS + i * 1000 for i in range(20)]
    # The room exists; its newest bridged message has ts t4 (RoomCreated carries
    # no id, so the pipeline dedups at t4 only by ids it knows itself).
    sink.existing[key] = t[4]
    wave1 = [msg(portal, f"m{i:02d}", t[i]) for i in (0, 1, 2, 3, 5, 6, 7)]
    wave1 += [msg(portal, "m04b", t[4])]  # same ts as the last bridged one: not lost
    wave1 += [msg(portal, "m05", t[5]), msg(portal, "m06", t[6])]  # duplicate ids
    await publish(settings, settings.catalog.history, [info(portal), *wave1, done(portal)])
    # newer than m04: m04b m05 m06 m07 (max_catchup_messages = 4 keeps all of them)
    await sink.wait_for(lambda: len(sink.sends(key)) == 4, workers=(worker,))
    assert sink.sent_ids(key) == ["m04b", "m05", "m06", "m07"]
    # the bridge was down again: history overlapping what is bridged, then new ones
    wave2 = [msg(portal, f"m{i:02d}", t[i]) for i in range(5, 16)]
    await publish(settings, settings.catalog.history, [*wave2, done(portal)])
    await sink.wait_for(lambda: len(sink.sends(key)) == 8, workers=(worker,))
    # m08..m15 are new; the catch-up cap keeps the newest 4
    assert sink.sent_ids(key)[4:] == ["m12", "m13", "m14", "m15"]
    live = msg(portal, "live1", t[19], history=False)
    await publish(settings, settings.catalog.live, [live])
    await sink.wait_for(lambda: len(sink.sends(key)) == 9, workers=(worker,))
    assert [s.seq for s in sink.sends(key)] == list(range(1, 10))
    st = await status_of(settings, key)
    assert st["last_bridged_ts"] == t[19] and st["state"] == "live"
    assert st["dropped"] == {"before_last_bridged": 4, "cap": 4}


async def test_live_message_requests_the_room(shared: tuple[Settings, Worker, CommandDriver]):
    settings, worker, sink = shared
    portal = unique("live")
    key = f"testnet:{portal}"
    sink.hold_rooms.add(key)
    await publish(settings, settings.catalog.live, [msg(portal, "l1", BASE_TS, history=False)])
    await sink.wait_for(lambda: len(sink.creates(key)) == 1, workers=(worker,))
    # while the room is being created, more arrives: held, released in order
    await publish(
        settings,
        settings.catalog.live,
        [msg(portal, "l0", BASE_TS - 1000, history=False), msg(portal, "l2", BASE_TS + 1)],
    )
    # live and portal-events are different topics: their relative order is not
    # defined, so answer only once the worker holds all three.
    for _ in range(100):
        st = await status_of(settings, key)
        if st["held"] == 3:
            break
        await asyncio.sleep(0.1)
    assert st["state"] == "waiting_for_room" and st["held"] == 3
    await sink.answer(key)
    await sink.wait_for(lambda: len(sink.sends(key)) == 3, workers=(worker,))
    assert sink.sent_ids(key) == ["l0", "l1", "l2"]


async def test_malformed_records_reach_dead_letters(shared: tuple[Settings, Worker, CommandDriver]):
    settings, worker, sink = shared
    portal = unique("dl")
    key = f"testnet:{portal}"
    bad_ts = encode(msg(portal, "x", BASE_TS)).replace(str(BASE_TS).encode(), b"17000")
    await publish(
        settings,
        settings.catalog.history,
        [
            (key, b"{not json"),
            (key, bad_ts),
            (key, encode(RoomCreated(network="testnet", portal=portal, room_id="!x:t"))),
            msg(portal, "ok", BASE_TS),
            done(portal),
        ],
    )
    await sink.wait_for(lambda: sink.sent_ids(key) == ["ok"], workers=(worker,))
    letters = [v for k, v in await read_topic(settings, settings.catalog.dead_letters)]
    mine = [d for d in letters if d.get("key") == key]
    assert len(mine) == 3
    assert all(d["stage"] == "pipeline" and d["source"] for d in mine)
    reasons = " | ".join(d["reason"] for d in mine)
    assert "invalid JSON" in reasons and "field 'ts'" in reasons and "does not belong" in reasons
    assert mine[0]["original"] == "{not json"


async def test_nul_in_portal_id_is_dead_lettered_and_later_portals_still_flow(
    shared: tuple[Settings, Worker, CommandDriver],
):
    """Issue 10 item 1: U+0000 in a portal id made the batch fail in Postgres, the
    fallback's error bookkeeping raised, the agent crashed and the partition stalled."""
    settings, worker, sink = shared
    portal = unique("after")
    key = f"testnet:{portal}"
    # Keyed like the good portal, so it lands on the same partition before it.
    poison = encode(msg(f"{portal}\x00evil", "p1", BASE_TS))
    good = [info(portal), msg(portal, "g1", BASE_TS + 1), done(portal)]
    await publish(settings, settings.catalog.history, [(key, poison), *good])
    await sink.wait_for(lambda: sink.sent_ids(key) == ["g1"], workers=(worker,))
    assert worker.alive()
    letters = [v for _, v in await read_topic(settings, settings.catalog.dead_letters)]
    mine = [d for d in letters if d.get("key") == key and "U+0000" in d["reason"]]
    assert len(mine) == 1
    assert mine[0]["stage"] == "pipeline"
    assert mine[0]["source"].startswith(f"{settings.catalog.history}[")
    assert "U+0000" in worker.log()  # logged at WARNING through the backflow logger


async def test_status_never_prints_a_strangers_escape_sequences(
    shared: tuple[Settings, Worker, CommandDriver],
):
    """A portal id carrying terminal escapes reaches `backflow status` escaped, not raw."""
    from tests.helpers import backflow_cli

    settings, worker, sink = shared
    portal = unique("esc") + "\x1b]0;owned\x07\u202e"
    key = f"testnet:{portal}"
    await publish(
        settings, settings.catalog.history, [info(portal), msg(portal, "m1", BASE_TS), done(portal)]
    )
    await sink.wait_for(lambda: len(sink.creates(key)) == 1, workers=(worker,))
    result = backflow_cli(settings, "status")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert "\\x1b]0;owned\\x07\\u202e" in result.stdout


def test_printable_escapes_controls_and_bidi_overrides():
    from backflow.cli.terminal import printable

    assert printable("ok: naïve 😀 日本") == "ok: naïve 😀 日本"
    assert printable("a\nb\r\x00\x7f\x9b[2J") == "a\\x0ab\\x0d\\x00\\x7f\\x9b[2J"
    assert printable("\u202eevil\u2066") == "\\u202eevil\\u2066"

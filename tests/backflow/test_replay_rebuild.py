"""`backflow replay --mode rebuild` on the real stack, rooms read back from Synapse.

A rebuild gives a portal a fresh room with its full history from the log
(capped as a new room), tombstones the old room towards it and moves the
portal's alias; the message map knows both rooms. An interrupted rebuild
(the CLI died after publishing the start and part of the history) is
resumed under the same name by the next run: no third room, each message
once, in order.
"""

from __future__ import annotations

import asyncpg

from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.ghosts import alias_localpart, room_alias
from connectors.matrix.registration import load_registration
from connectors.matrix.store import SinkStore
from tests.backflow.test_replay import cli, commands, log, sink_once
from tests.helpers import read_raw
from tests.sink_helpers import BASE_TS, NET, client_for, create, message, publish, text
from topics.codec import decode
from topics.records import Content, CreateRoom, Member, PortalInfo, SendMessage
from topics.settings import Settings

RB, FRESH = "rb-resume", "rb-fresh"


async def current_room(settings: Settings, portal: str) -> str:
    store = await SinkStore.open(settings.database.url, size=1)
    try:
        room = await store.room(f"{NET}:{portal}")
    finally:
        await store.close()
    assert room is not None
    return room


async def timeline(settings: Settings, room_id: str) -> list[dict]:
    async with client_for(settings) as client:
        return await client.timeline(room_id)


def source_ids(events: list[dict]) -> list[str]:
    return [e["content"][SOURCE_KEY]["id"] for e in events if SOURCE_KEY in e.get("content", {})]


def info(portal: str) -> PortalInfo:
    members = (Member(id="ann", name="Ann"), Member(id="bob", name="Bob"))
    return PortalInfo(network=NET, portal=portal, name=f"Chat {portal}", members=members)


async def test_rebuild_resumes_and_tombstones(stack: Settings) -> None:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    msgs = [
        text(RB, f"m{i}", "ann" if i % 2 else "bob", BASE_TS + i * 1000, f"msg {i}")
        for i in range(1, 5)
    ]
    like = message(RB, "r1", "bob", BASE_TS + 5000, Content(kind="reaction", target="m1", key="+"))
    await log(stack, stack.catalog.history, [info(RB), *msgs, like])
    await publish(stack, [create(RB), *(SendMessage(m, i) for i, m in enumerate(msgs[:3], 1))])
    await sink_once(stack)
    old = await current_room(stack, RB)
    assert source_ids(await timeline(stack, old)) == ["m1", "m2", "m3"]

    # A rebuild that died after publishing its start and two messages.
    start = CreateRoom(network=NET, portal=RB, name=f"Chat {RB}", rebuild="aaa111")
    await publish(stack, [start, SendMessage(msgs[0], 0), SendMessage(msgs[1], 0)])
    await sink_once(stack)
    new = await current_room(stack, RB)
    assert new != old
    assert source_ids(await timeline(stack, new)) == ["m1", "m2"]

    before = len(await commands(stack))
    dry = cli(stack, "--portal", f"{NET}:{RB}", "--mode", "rebuild", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"resuming rebuild aaa111: old room {old}, new room {new}: would send 3" in dry.stdout
    assert "would tombstone the old room, move the alias" in dry.stdout, dry.stdout
    assert "create the new room" not in dry.stdout
    assert len(await commands(stack)) == before  # a dry run publishes nothing

    done = cli(stack, "--portal", f"{NET}:{RB}", "--mode", "rebuild")
    assert done.returncode == 0, done.stderr
    assert "published 3 message(s)" in done.stdout, done.stdout
    await sink_once(stack)
    assert await current_room(stack, RB) == new  # no third room
    events = await timeline(stack, new)
    assert source_ids(events) == ["m1", "m2", "m3", "m4", "r1"]
    [reaction] = [e for e in events if e["type"] == "m.reaction"]
    m1_event = next(e for e in events if e.get("content", {}).get(SOURCE_KEY, {}).get("id") == "m1")
    assert reaction["content"]["m.relates_to"]["event_id"] == m1_event["event_id"]
    [tombstone] = [e for e in await timeline(stack, old) if e["type"] == "m.room.tombstone"]
    assert tombstone["content"]["replacement_room"] == new
    reg = load_registration(stack.appservice.registration)
    server = stack.homeserver.server_name
    assert server is not None
    async with client_for(stack) as client:
        assert await client.resolve_alias(room_alias(reg.alias_prefix, NET, RB, server)) == new
        temporary = alias_localpart(reg.alias_prefix, NET, f"{RB}/rebuild-aaa111", server)
        assert await client.resolve_alias(f"#{temporary}:{server}") is None
    # The map knows both rooms, and which replaced which.
    db = await asyncpg.connect(stack.database.url)
    try:
        rows = await db.fetch(
            "SELECT room_id, count(*) AS n FROM sink_messages GROUP BY room_id ORDER BY n"
        )
        assert [(r["room_id"], r["n"]) for r in rows] == [(old, 3), (new, 5)]
        rebuild = await db.fetchrow("SELECT * FROM sink_rebuilds")
        assert (rebuild["old_room"], rebuild["new_room"]) == (old, new)
        assert rebuild["finished_at"] is not None
    finally:
        await db.close()
    # The rebuilt room is complete: a catch-up finds nothing to send.
    after = cli(stack, "--portal", f"{NET}:{RB}")
    assert "published 0 message(s)" in after.stdout, after.stdout


async def test_fresh_rebuild_is_capped_like_a_new_room(stack: Settings) -> None:
    # With an alias naming template (sink.alias_templates), as a bridge's own rooms.
    reg = load_registration(stack.appservice.registration)
    server = stack.homeserver.server_name
    assert server is not None
    templates = {NET: f"{reg.alias_prefix}tpl_"}
    tpl = stack.with_overrides({"sink.alias_templates": f"{NET}={reg.alias_prefix}tpl_{{id}}"})
    tpl.state_dir.mkdir(parents=True, exist_ok=True)
    msgs = [text(FRESH, f"f{i}", "ann", BASE_TS + i * 1000, f"f {i}") for i in range(1, 6)]
    await log(tpl, tpl.catalog.history, [info(FRESH), *msgs])
    await publish(tpl, [create(FRESH), SendMessage(msgs[0], 1)])
    await sink_once(tpl)
    old = await current_room(tpl, FRESH)
    alias = room_alias(reg.alias_prefix, NET, FRESH, server, templates)
    async with client_for(tpl) as client:
        assert await client.resolve_alias(alias) == old
    capped = {"BACKFLOW_BACKFILL_MAX_INITIAL_MESSAGES": "3"}
    done = cli(tpl, "--portal", f"{NET}:{FRESH}", "--mode", "rebuild", extra=capped)
    assert done.returncode == 0, done.stderr
    assert "starting rebuild " in done.stdout and "new room not created yet" in done.stdout
    assert "published 3 message(s)" in done.stdout, done.stdout
    await sink_once(tpl)
    new = await current_room(tpl, FRESH)
    assert new != old
    events = await timeline(tpl, new)
    assert source_ids(events) == ["f3", "f4", "f5"]
    names = [e["content"].get("name") for e in events if e["type"] == "m.room.name"]
    assert names == [f"Chat {FRESH}"]  # from the portal record in the log
    assert any(e["type"] == "m.room.tombstone" for e in await timeline(tpl, old))
    async with client_for(tpl) as client:
        assert await client.resolve_alias(alias) == new


async def test_sink_side_of_a_rebuild_is_idempotent(stack: Settings) -> None:
    portal = "rb-crash"
    key = f"{NET}:{portal}"
    first = text(portal, "c1", "ann", BASE_TS, "only")
    await publish(stack, [create(portal), SendMessage(first, 1)])
    await sink_once(stack)
    old = await current_room(stack, portal)
    start = CreateRoom(network=NET, portal=portal, rebuild="bbb222")
    await publish(stack, [start, SendMessage(first, 0)])
    await sink_once(stack)
    new = await current_room(stack, portal)
    assert new != old
    # The sink died after creating the room, before recording it: the start
    # comes again and finds the room by its temporary alias (no third room).
    db = await asyncpg.connect(stack.database.url)
    try:
        await db.execute("UPDATE sink_rebuilds SET new_room = NULL")
        await db.execute("UPDATE sink_rooms SET room_id = $1 WHERE portal_key = $2", old, key)
        finish = CreateRoom(network=NET, portal=portal, finish_rebuild="bbb222")
        await publish(stack, [start, SendMessage(first, 0), finish, finish])
        await sink_once(stack)
        assert await current_room(stack, portal) == new
        assert await db.fetchval("SELECT new_room FROM sink_rebuilds") == new
        assert await db.fetchval("SELECT count(*) FROM sink_rooms") == 1
    finally:
        await db.close()
    assert source_ids(await timeline(stack, new)) == ["c1"]
    tombstones = [e for e in await timeline(stack, old) if e["type"] == "m.room.tombstone"]
    assert [t["content"]["replacement_room"] for t in tombstones] == [new]
    # A finish for a rebuild that never started is refused (a dead letter).
    await publish(stack, [CreateRoom(network=NET, portal=portal, finish_rebuild="ccc333")])
    await sink_once(stack)
    letters = [decode(v) for _, v in await read_raw(stack, stack.catalog.dead_letters)]
    assert [d.reason for d in letters] == [
        f"RebuildRefused: rebuild ccc333 of portal {key} was never started"
    ]


async def test_catchup_after_a_rebuild_start_counts_only_sends_after_it(stack: Settings) -> None:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    portal = "rb-then-catchup"
    m1, m2 = (text(portal, f"k{i}", "ann", BASE_TS + i * 1000, f"k {i}") for i in (1, 2))
    await log(stack, stack.catalog.history, [m1, m2])
    await publish(stack, [create(portal), SendMessage(m1, 1), SendMessage(m2, 2)])
    start = CreateRoom(network=NET, portal=portal, rebuild="ddd444")
    await publish(stack, [start, SendMessage(m1, 0)])  # a rebuild cut short
    await sink_once(stack)
    new = await current_room(stack, portal)
    assert source_ids(await timeline(stack, new)) == ["k1"]
    # k2's send in the log went to the old room: not "queued" for the new one.
    done = cli(stack, "--portal", f"{NET}:{portal}")
    assert "published 1 message(s)" in done.stdout, done.stdout
    await sink_once(stack)
    assert source_ids(await timeline(stack, new)) == ["k1", "k2"]

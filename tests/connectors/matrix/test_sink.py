"""The Matrix sink against a real Synapse, Postgres and broker.

Every assertion is read back from Synapse (/messages), not from our own state.
"""

from __future__ import annotations

import asyncio
import base64
import uuid

import orjson

from backflow.stack.synapse import Synapse
from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.ghosts import ghost_user_id, room_alias
from connectors.matrix.registration import load_registration
from connectors.matrix.runner import run_sink
from connectors.matrix.store import SinkStore
from tests.fault_proxy import fault_proxy_for
from tests.helpers import read_raw
from tests.sink_helpers import (
    BASE_TS,
    NET,
    bodies,
    client_for,
    create,
    message,
    publish,
    publish_raw,
    room_messages,
    sends,
    text,
)
from topics.codec import decode
from topics.records import Content, RoomCreated, SendMessage
from topics.settings import Settings


def portal_id() -> str:
    return f"Chat/{uuid.uuid4().hex[:8]}"


async def room_of(settings: Settings, portal: str) -> str:
    store = await SinkStore.open(settings.database.url)
    try:
        room = await store.room(f"{NET}:{portal}")
    finally:
        await store.close()
    assert room is not None
    return room


async def test_backfill_order_ts_html_and_ghosts(stack: Settings) -> None:
    portal = portal_id()
    members = [("Alice", "Alice A."), ("+358 40 1234", "Bob")]
    msgs = [
        text(
            portal,
            f"m{i}",
            members[i % 2][0],
            BASE_TS + i * 1000,
            f"hello {i}",
            name=members[i % 2][1],
        )
        for i in range(20)
    ]
    msgs.append(
        text(
            portal,
            "html",
            "Alice",
            BASE_TS + 30_000,
            "bold",
            name="Alice A.",
            html='<b onclick="x()">bold</b><script>alert(1)</script>'
            '<a href="javascript:alert(1)">j</a><a href="https://ok.example">ok</a>',
        )
    )
    await publish(
        stack, [create(portal, members, name="Portal name", topic="Portal topic"), *sends(msgs)]
    )
    stats = await run_sink(stack, idle_exit=2.0)
    assert stats.sent == 21 and stats.dead_letters == 0

    room = await room_of(stack, portal)
    async with client_for(stack) as client:
        events = await room_messages(client, room)
        assert bodies(events) == [f"hello {i}" for i in range(20)] + ["bold"]
        assert [e["origin_server_ts"] for e in events] == [m.ts for m in msgs]
        reg = load_registration(stack.appservice.registration)
        server = stack.homeserver.server_name
        assert server
        alice = ghost_user_id(reg.user_prefix, NET, "Alice", server)
        bob = ghost_user_id(reg.user_prefix, NET, "+358 40 1234", server)
        assert [e["sender"] for e in events[:2]] == [alice, bob]
        assert events[0]["content"][SOURCE_KEY] == {
            "network": NET,
            "portal": portal,
            "id": "m0",
            "part": 0,
        }
        html = events[-1]["content"]
        assert html["format"] == "org.matrix.custom.html"
        assert html["formatted_body"] == '<b>bold</b><a>j</a><a href="https://ok.example">ok</a>'
        # ghost display names and room metadata as Synapse has them
        prof = await client.get("profile", alice)
        assert prof["displayname"] == "Alice A."
        state = await client.get("rooms", room, "state")
        names = [s["content"].get("name") for s in state if s["type"] == "m.room.name"]
        topics = [s["content"].get("topic") for s in state if s["type"] == "m.room.topic"]
        assert names == ["Portal name"] and topics == ["Portal topic"]
        alias = room_alias(reg.alias_prefix, NET, portal, server)
        assert await client.resolve_alias(alias) == room

    # RoomCreated published for the pipeline
    events_raw = [v for _, v in await read_raw(stack, stack.catalog.portal_events)]
    created = [decode(v) for v in events_raw]
    assert created == [
        RoomCreated(network=NET, portal=portal, room_id=room, alias=alias, last_bridged_ts=None)
    ]


async def test_idempotent_room_creation_and_replay(stack: Settings) -> None:
    """A repeated CreateRoom finds the same room; replayed sends are skipped."""
    portal = portal_id()
    msgs = [text(portal, f"m{i}", "carol", BASE_TS + i, f"c{i}") for i in range(5)]
    cmds = [create(portal, [("carol", "Carol")]), *sends(msgs)]
    await publish(stack, cmds)
    await run_sink(stack, idle_exit=1.5)
    # Replay everything (a pipeline rebuild or replay re-publishes the commands).
    await publish(stack, cmds)
    stats = await run_sink(stack, idle_exit=1.5)
    assert stats.sent == 0 and stats.skipped == 5 and stats.rooms_created == 0
    room = await room_of(stack, portal)
    # A fresh database (state lost) still finds the room through its alias.
    store = await SinkStore.open(stack.database.url)
    await store.pool.execute("DELETE FROM sink_rooms")
    await store.close()
    await publish(stack, [create(portal)])
    stats = await run_sink(stack, idle_exit=1.5)
    assert stats.rooms_created == 0 and stats.rooms_found == 1
    assert await room_of(stack, portal) == room
    async with client_for(stack) as client:
        assert bodies(await room_messages(client, room)) == [f"c{i}" for i in range(5)]
    created = [decode(v) for _, v in await read_raw(stack, stack.catalog.portal_events)]
    assert {c.room_id for c in created} == {room}
    assert [c.last_bridged_ts for c in created] == [None, BASE_TS + 4, BASE_TS + 4]


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


async def test_media_relations_and_dead_letters(stack: Settings) -> None:
    portal = portal_id()
    p = portal
    t = BASE_TS
    msgs = [
        text(p, "root", "dave", t + 1, "root message"),
        message(
            p,
            "img",
            "erin",
            t + 2,
            Content(
                kind="media",
                media_type="image",
                body="a pixel",
                filename="p.png",
                mimetype="image/png",
                data=base64.b64encode(PNG).decode(),
                width=1,
                height=1,
            ),
        ),
        message(
            p, "loc", "dave", t + 3, Content(kind="location", lat=60.17, lon=24.94, body="Helsinki")
        ),
        text(p, "reply", "erin", t + 4, "a reply", reply_to="root"),
        text(p, "inthread", "dave", t + 5, "in thread", thread="root"),
        message(p, "edit", "dave", t + 6, Content(kind="edit", target="root", body="root v2")),
        message(p, "react", "erin", t + 7, Content(kind="reaction", target="root", key="👍")),
        # Same reaction again by the same ghost: Synapse answers 400.
        message(p, "react2", "erin", t + 8, Content(kind="reaction", target="root", key="👍")),
        message(p, "emote", "dave", t + 9, Content(kind="emote", body="waves")),
        text(p, "gone", "erin", t + 10, "to be deleted"),
        message(p, "del", "erin", t + 11, Content(kind="redaction", target="gone", reason="oops")),
        message(p, "orphan", "dave", t + 12, Content(kind="reaction", target="nope", key="x")),
        text(p, "orphanreply", "dave", t + 13, "reply to unknown", reply_to="nope"),
        message(
            p,
            "file",
            "dave",
            t + 14,
            Content(kind="media", media_type="file", url="file:///etc/passwd", filename="passwd"),
        ),
        text(p, "last", "dave", t + 15, "still flowing"),
    ]
    await publish(stack, [create(portal, [("dave", "Dave"), ("erin", "Erin")]), *sends(msgs)])
    # A malformed command in the same partition: dead letter, partition keeps flowing.
    await publish_raw(stack, f"{NET}:{portal}", [b'{"type": "send", "message": {"id": 1}}'])
    await publish(stack, sends([text(p, "after", "dave", t + 16, "after bad record")]))
    stats = await run_sink(stack, idle_exit=2.0)
    assert stats.dead_letters == 4, stats

    room = await room_of(stack, portal)
    async with client_for(stack) as client:
        events = await room_messages(client, room)
        by_src = {e["content"][SOURCE_KEY]["id"]: e for e in events if SOURCE_KEY in e["content"]}
        root = by_src["root"]["event_id"]
        img = by_src["img"]["content"]
        assert img["msgtype"] == "m.image" and img["info"] == {
            "mimetype": "image/png",
            "size": len(PNG),
            "w": 1,
            "h": 1,
        }
        assert await client.download(img["url"]) == PNG
        assert by_src["loc"]["content"]["geo_uri"] == "geo:60.17,24.94"
        assert by_src["reply"]["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": root}}
        thread_rel = by_src["inthread"]["content"]["m.relates_to"]
        assert thread_rel["rel_type"] == "m.thread" and thread_rel["event_id"] == root
        edit = by_src["edit"]["content"]
        assert edit["m.relates_to"] == {"rel_type": "m.replace", "event_id": root}
        assert edit["body"] == "* root v2" and edit["m.new_content"]["body"] == "root v2"
        react = by_src["react"]
        assert react["type"] == "m.reaction"
        assert react["content"]["m.relates_to"] == {
            "rel_type": "m.annotation",
            "event_id": root,
            "key": "👍",
        }
        assert by_src["emote"]["content"]["msgtype"] == "m.emote"
        redaction = by_src["del"]
        assert redaction["type"] == "m.room.redaction"
        gone = [e for e in events if e["event_id"] == redaction["content"]["redacts"]]
        assert gone and gone[0]["content"] == {}  # the target is redacted
        assert "m.relates_to" not in by_src["orphanreply"]["content"]
        assert "react2" not in by_src and "orphan" not in by_src and "file" not in by_src
        assert by_src["last"]["content"]["body"] == "still flowing"
        assert by_src["after"]["content"]["body"] == "after bad record"
        # Order and timestamps of what was sent (the redaction has no ts: endpoint limit).
        sent = [e for e in events if e["type"] != "m.room.redaction"]
        assert [e["origin_server_ts"] for e in sent] == sorted(e["origin_server_ts"] for e in sent)

    letters = [decode(v) for _, v in await read_raw(stack, stack.catalog.dead_letters)]
    reasons = {(orjson.loads(d.original).get("message") or {}).get("id"): d.reason for d in letters}
    assert all(d.stage == "sink" for d in letters)
    assert "HTTP 400" in reasons["react2"] and "homeserver refused" in reasons["react2"]
    assert "target 'nope'" in reasons["orphan"]
    assert "file:" in reasons["file"]
    assert any("malformed" in r for r in reasons.values())
    token = load_registration(stack.appservice.registration).as_token
    assert all(token not in d.reason and token not in d.original for d in letters)
    # The original bytes are the command, decodable again.
    assert isinstance(
        decode(next(d.original for d in letters if "target 'nope'" in d.reason)), SendMessage
    )


async def test_in_doubt_sends_are_settled_not_resent(stack: Settings) -> None:
    """A crash after the homeserver stored events but before the map did.

    Simulated exactly: run, then turn the recorded rows back into intents (as
    a crash between send and record leaves them) and replay the commands.
    """
    portal = portal_id()
    p = portal
    msgs = [
        text(p, "a", "fay", BASE_TS + 1, "first"),
        text(p, "b", "fay", BASE_TS + 2, "second"),
        message(p, "c", "fay", BASE_TS + 3, Content(kind="redaction", target="b")),
        text(p, "d", "fay", BASE_TS + 4, "third"),
    ]
    cmds = [create(portal, [("fay", "Fay")]), *sends(msgs)]
    await publish(stack, cmds)
    await run_sink(stack, idle_exit=1.5)
    room = await room_of(stack, portal)
    store = await SinkStore.open(stack.database.url)
    try:
        await store.pool.execute(
            """WITH gone AS (DELETE FROM sink_messages WHERE message_id <> 'a' RETURNING *)
               INSERT INTO sink_intents (room_id, portal_key, message_id, part, txn_id)
               SELECT room_id, portal_key, message_id, part, 'x' FROM gone"""
        )
        await publish(stack, cmds)
        stats = await run_sink(stack, idle_exit=1.5)
        assert stats.settled == 3 and stats.sent == 0, stats.summary()
        assert await store.intents() == []
    finally:
        await store.close()
    async with client_for(stack) as client:
        events = await room_messages(client, room)
    assert [e["type"] for e in events] == [
        "m.room.message",
        "m.room.message",
        "m.room.redaction",
        "m.room.message",
    ]
    assert bodies(events) == ["first", None, "third"]


async def test_show_and_clear_errors(stack: Settings) -> None:
    from click.testing import CliRunner

    from backflow.cli.sink import show_command, sink_command, timeline_lines
    from connectors.matrix.sink import SinkError

    portal = portal_id()
    msgs = [text(portal, f"m{i}", "gus", BASE_TS + i * 60_000, f"line {i}") for i in range(3)]
    await publish(stack, [create(portal, [("gus", "Gus")]), *sends(msgs)])
    await run_sink(stack, idle_exit=1.5)
    for ref in (f"{NET}:{portal}", portal, await room_of(stack, portal)):
        lines = await timeline_lines(stack, ref)
        assert [line.split("  ")[2] for line in lines] == ["line 0", "line 1", "line 2"]
        assert lines[1].startswith("2020-09-13T12:27:40.000Z  @")

    down = stack.with_overrides({"homeserver.url": "http://127.0.0.1:9"})
    try:
        await run_sink(down, idle_exit=0.1)
        raise AssertionError("expected SinkError")
    except SinkError as exc:
        assert "cannot reach the homeserver at http://127.0.0.1:9" in str(exc)
    no_db = stack.with_overrides({"database.url": "postgresql://nobody@127.0.0.1:9/x"})
    try:
        await run_sink(no_db, idle_exit=0.1)
        raise AssertionError("expected SinkError")
    except SinkError as exc:
        assert "cannot reach the database" in str(exc)
    runner = CliRunner()
    for command, args in ((sink_command, []), (show_command, ["x:y"])):
        result = await asyncio.to_thread(
            runner.invoke, command, args, obj={"settings": down}, catch_exceptions=False
        )
        assert result.exit_code == 1
        assert result.output.strip().startswith("Error: cannot reach the homeserver")
        assert "Traceback" not in result.output


async def test_value_the_database_refuses_is_dead_lettered_not_retried(stack: Settings) -> None:
    """Issue 10, item 2: a value the sink's database refuses is refused for good.

    It was a NUL in a display name; the codec refuses those now, where an
    import still knows the line (tests/hostile), so a trigger refuses a name
    here: a real Postgres error, permanent. It is dead-lettered with its real
    source and key; the portal's other messages still arrive, in order, as
    read back from Synapse.
    """
    store = await SinkStore.open(stack.database.url, size=1)  # the sink's schema, then:
    try:
        await store.pool.execute(
            """
            CREATE FUNCTION refuse_name() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.displayname = 'Refused Name' THEN
                    RAISE EXCEPTION 'display name refused by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_name BEFORE INSERT OR UPDATE ON sink_ghosts
                FOR EACH ROW EXECUTE FUNCTION refuse_name();
            """
        )
    finally:
        await store.close()
    portal = portal_id()
    msgs = [
        text(portal, "n0", "frank", BASE_TS + 1, "before"),
        text(portal, "n1", "refused", BASE_TS + 2, "poison", name="Refused Name"),
        text(portal, "n2", "frank", BASE_TS + 3, "after"),
    ]
    await publish(stack, [create(portal, [("frank", "Frank")]), *sends(msgs)])
    # Retried forever, this would never go idle: bound it.
    stats = await asyncio.wait_for(run_sink(stack, idle_exit=2.0), timeout=120)
    assert stats.sent == 2 and stats.dead_letters == 1, stats

    room = await room_of(stack, portal)
    async with client_for(stack) as client:
        events = await room_messages(client, room)
        assert bodies(events) == ["before", "after"]

    letters = [decode(v) for _, v in await read_raw(stack, stack.catalog.dead_letters)]
    mine = [d for d in letters if d.key == f"{NET}:{portal}"]
    assert len(mine) == 1, mine
    letter = mine[0]
    assert letter.stage == "sink" and "poison" in letter.original
    assert "display name refused by the test" in letter.reason, letter
    assert letter.source is not None
    assert letter.source.startswith(f"{stack.catalog.matrix_commands}[")
    assert "@" in letter.source


async def test_homeserver_away_past_the_retry_budget_waits_not_dead_letters(
    stack: Settings, synapse: Synapse
) -> None:
    """A send failing transiently longer than sink.give_up_after_s is put back, not lost.

    The proxy answers every send with 503 for 4 s, four times the 1 s budget of
    one request: the command goes round again and lands once when the homeserver
    is back; nothing becomes a dead letter.
    """
    portal = portal_id()
    msgs = [text(portal, f"w{i}", "gina", BASE_TS + i, f"away {i}") for i in range(3)]
    await publish(stack, [create(portal, [("gina", "Gina")]), *sends(msgs)])
    async with fault_proxy_for(synapse) as proxy:
        busy = {"errcode": "M_UNKNOWN", "error": "upstream away"}
        proxy.inject(503, busy, times=1_000_000, match="/send/m.room.message/")
        settings = stack.with_overrides(
            {
                "homeserver.url": proxy.url,
                "sink.give_up_after_s": 1.0,
                "sink.max_retry_delay_s": 0.2,
            }
        )
        run = asyncio.create_task(run_sink(settings, idle_exit=3.0))
        await asyncio.sleep(4.0)
        refused = len(proxy.requests("/send/m.room.message/", "PUT"))
        proxy.clear_faults()
        stats = await asyncio.wait_for(run, timeout=120)
    assert refused >= 5, refused  # it really kept trying through the outage
    assert stats.sent == 3 and stats.dead_letters == 0 and stats.retries >= 1, stats
    room = await room_of(stack, portal)
    async with client_for(stack) as client:
        assert bodies(await room_messages(client, room)) == [f"away {i}" for i in range(3)]
    letters = [decode(v) for _, v in await read_raw(stack, stack.catalog.dead_letters)]
    assert [d for d in letters if d.key == f"{NET}:{portal}"] == []

"""Pure parts of the sink (ids, content, registration, offsets), and the HTTP
client against the real Synapse behind a fault-injecting proxy (tests/fault_proxy.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from aiohttp import web
from aiokafka import TopicPartition

from backflow.cli.sink import progress_printer
from backflow.stack.synapse import Appservice, Synapse
from connectors.matrix.calls import room_slot
from connectors.matrix.client import (
    MAX_500_RETRIES,
    MatrixClient,
    MatrixRequestError,
    MatrixUnreachable,
    MediaError,
)
from connectors.matrix.content import SOURCE_KEY, build_content, redaction_content, sanitize_html
from connectors.matrix.fetch import MediaPolicy, fetch_url, media_session
from connectors.matrix.ghosts import (
    alias_localpart,
    escape,
    ghost_localpart,
    ghost_user_id,
    parse_ghost,
    unescape,
)
from connectors.matrix.offsets import OffsetTracker
from connectors.matrix.registration import RegistrationError, literal_prefix, load_registration
from connectors.matrix.send import txn_id
from connectors.matrix.stats import SinkStats
from connectors.sink_runtime import Committer
from tests.conftest import unique
from tests.fault_proxy import FaultProxy
from topics.records import Content, NetworkMessage, Sender

ALLOWED = set("abcdefghijklmnopqrstuvwxyz0123456789._=-/")


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` on a free 127.0.0.1 port; clean up with ``runner.cleanup()``."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


# ---------------------------------------------------------------- ghosts


@pytest.mark.parametrize(
    "raw, escaped",
    [
        ("alice", "alice"),
        ("Alice", "_alice"),
        ("snake_case", "snake__case"),
        ("+358 40", "=2b358=2040"),
        ("a=b", "a=3db"),
        ("Ä", "=c3=84"),
        ("U123/x.y-z", "_u123/x.y-z"),
    ],
)
def test_escape_examples(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped
    assert unescape(escaped) == raw


@pytest.mark.parametrize(
    "raw", ["", "__", "_A", "Ω≈ç√ 💬", "a:b@c#d", "=5f", "user_Name", "x" * 300, "UPPER lower"]
)
def test_escape_roundtrip_and_alphabet(raw: str) -> None:
    out = escape(raw)
    assert set(out) <= ALLOWED
    assert unescape(out) == raw


def test_ghost_ids_reversible_and_separated() -> None:
    # network "a_b" + id "c" must differ from network "a" + id "b_c"
    one = ghost_localpart("_bf_", "a_b", "c", "hs")
    two = ghost_localpart("_bf_", "a", "b_c", "hs")
    assert one != two
    assert parse_ghost("_bf_", f"@{one}:hs") == ("a_b", "c")
    assert parse_ghost("_bf_", f"@{two}:hs") == ("a", "b_c")
    assert ghost_user_id("_bf_", "whatsapp", "+15551234", "example.org") == (
        "@_bf_whatsapp_=2b15551234:example.org"
    )
    assert parse_ghost("_bf_", "@someone:hs") is None
    assert alias_localpart("_bf_", "slack", "C0123", "hs") == "_bf_slack__c0123"


def test_long_ids_fit_and_stay_unique() -> None:
    a = ghost_user_id("_bf_", "net", "Ä" * 200, "example.org")
    b = ghost_user_id("_bf_", "net", "Ä" * 199 + "Ö", "example.org")
    assert len(a) <= 255 and len(b) <= 255 and a != b
    assert set(a[1:].split(":")[0]) <= ALLOWED | {"~"}
    assert parse_ghost("_bf_", a) == ("net", None)


# ---------------------------------------------------------------- registration


def test_literal_prefix() -> None:
    assert literal_prefix(r"@_bf_.*:example\.org", "@") == "_bf_"
    assert literal_prefix(r"^@_bf\.x_.*", "@") == "_bf.x_"
    assert literal_prefix(r"#_bf_[a-z]+:.*", "#") == "_bf_"
    assert literal_prefix(r"@bot_?x.*", "@") == "bot"
    with pytest.raises(RegistrationError):
        literal_prefix("_bf_.*", "@")


def test_load_registration(tmp_path: Path) -> None:
    path = tmp_path / "reg.yaml"
    path.write_text(
        "id: x\nas_token: secret-token\nhs_token: h\nsender_localpart: bot\n"
        "namespaces:\n  users:\n  - {exclusive: false, regex: '@other_.*'}\n"
        "  - {exclusive: true, regex: '@_bf_.*:hs'}\n"
        "  aliases:\n  - {exclusive: true, regex: '#_bfa_.*:hs'}\n"
    )
    reg = load_registration(path)
    assert (reg.user_prefix, reg.alias_prefix, reg.sender_localpart) == ("_bf_", "_bfa_", "bot")
    assert "secret-token" not in repr(reg)
    with pytest.raises(RegistrationError, match="cannot read"):
        load_registration(tmp_path / "missing.yaml")
    with pytest.raises(RegistrationError, match="no appservice registration"):
        load_registration(None)
    path.write_text("as_token: t\nsender_localpart: b\nnamespaces: {users: []}\n")
    with pytest.raises(RegistrationError, match="namespaces.users is empty"):
        load_registration(path)


# ---------------------------------------------------------------- content


def msg(content: Content, **kw: object) -> NetworkMessage:
    return NetworkMessage(
        network="net",
        portal="p",
        id="m1",
        sender=Sender(id="u"),
        ts=1_600_000_000_000,
        content=content,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "html, clean",
    [
        ("<b>x</b>", "<b>x</b>"),
        ('<b onclick="evil()">x</b>', "<b>x</b>"),
        ("<script>alert(1)</script>ok", "ok"),
        ("<style>p{}</style><p>t</p>", "<p>t</p>"),
        ('<a href="javascript:alert(1)">j</a>', "<a>j</a>"),
        ('<a href=" JavaScript:x">j</a>', "<a>j</a>"),
        (
            '<a href="https://x.org/?a=1&b=2" target="_blank">l</a>',
            '<a href="https://x.org/?a=1&amp;b=2" target="_blank">l</a>',
        ),
        ('<img src="https://evil/x.png">', ""),
        ('<img src="mxc://hs/abc" alt="a">', '<img src="mxc://hs/abc" alt="a">'),
        ("<iframe src=x>in</iframe>after", "after"),
        ("<unknown>text</unknown>", "text"),
        ("<b><i>x</b>", "<b><i>x</i></b>"),
        ("<p>open", "<p>open</p>"),
        ("1 < 2 &amp; 3", "1 &lt; 2 &amp; 3"),
        (
            '<code class="language-py">x</code><code class="evil">y</code>',
            '<code class="language-py">x</code><code>y</code>',
        ),
        (
            '<span data-mx-spoiler="" style="color:red">s</span>',
            '<span data-mx-spoiler="">s</span>',
        ),
        # the spec's attribute lists, per tag
        ('<font color="red" face="x">f</font>', '<font color="red">f</font>'),
        ('<ol start="3" type="a"><li>x</li></ol>', '<ol start="3"><li>x</li></ol>'),
        ('<img src="mxc://hs/a" onerror="x()">', '<img src="mxc://hs/a">'),
        ("<strike>x</strike><s>y</s>", "<strike>x</strike><s>y</s>"),
        # link schemes: https http ftp mailto magnet; mxc only for img src
        ('<a href="ftp://h/f">f</a>', '<a href="ftp://h/f">f</a>'),
        ('<a href="magnet:?xt=urn:x">m</a>', '<a href="magnet:?xt=urn:x">m</a>'),
        ('<a href="mxc://hs/a">m</a>', "<a>m</a>"),
        ('<a href="data:text/html,x">d</a>', "<a>d</a>"),
        ('<a href="https://x" target="_top">t</a>', '<a href="https://x">t</a>'),
        ("<mx-reply><blockquote>quoted</blockquote></mx-reply>reply", "reply"),
        ("<!-- hidden --><b>c</b>", "<b>c</b>"),
    ],
)
def test_sanitize_html(html: str, clean: str) -> None:
    assert sanitize_html(html) == clean


def built(*args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """build_content's result as the JSON mautrix sends."""
    event_type, content = build_content(*args, **kwargs)
    return event_type, content.serialize()


def test_text_kinds_and_source() -> None:
    t, c = built(msg(Content(kind="text", body="hi", html="<b>hi</b>")))
    assert t == "m.room.message"
    assert c == {
        "msgtype": "m.text",
        "body": "hi",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>hi</b>",
        SOURCE_KEY: {"network": "net", "portal": "p", "id": "m1", "part": 0},
    }
    assert built(msg(Content(kind="notice", body="n")))[1]["msgtype"] == "m.notice"
    assert built(msg(Content(kind="emote", body="e")))[1]["msgtype"] == "m.emote"
    # HTML that sanitizes to nothing is left out
    assert "format" not in built(msg(Content(kind="text", body="x", html="<script>")))[1]


def test_media_location_relations() -> None:
    media = Content(
        kind="media",
        media_type="video",
        body="clip",
        filename="c.mp4",
        mimetype="video/mp4",
        data="AA==",
        width=640,
        height=480,
        duration_ms=1500,
    )
    t, c = built(msg(media), mxc="mxc://hs/v", media_size=1234)
    assert c["msgtype"] == "m.video" and c["url"] == "mxc://hs/v" and c["filename"] == "c.mp4"
    assert c["info"] == {
        "mimetype": "video/mp4",
        "size": 1234,
        "w": 640,
        "h": 480,
        "duration": 1500,
    }
    with pytest.raises(ValueError):
        built(msg(media))
    _, c = built(msg(Content(kind="location", lat=1.5, lon=-2.0)))
    assert c["msgtype"] == "m.location" and c["geo_uri"] == "geo:1.5,-2.0"
    _, c = built(msg(Content(kind="text", body="r"), reply_to="x"), reply_event="$r")
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$r"}}
    _, c = built(msg(Content(kind="text", body="t"), thread="x"), thread_root="$root")
    assert c["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$root"},
    }
    _, c = built(
        msg(Content(kind="edit", target="x", body="new", html="<i>new</i>")), target_event="$o"
    )
    assert c["body"] == "* new" and c["formatted_body"] == "* <i>new</i>"
    assert c["m.new_content"] == {
        "msgtype": "m.text",
        "body": "new",
        "format": "org.matrix.custom.html",
        "formatted_body": "<i>new</i>",
    }
    assert c["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$o"}
    t, c = built(msg(Content(kind="reaction", target="x", key="👍")), target_event="$o")
    assert t == "m.reaction"
    assert c["m.relates_to"] == {"rel_type": "m.annotation", "event_id": "$o", "key": "👍"}
    with pytest.raises(ValueError):
        built(msg(Content(kind="reaction", target="x", key="k")))
    red = redaction_content(msg(Content(kind="redaction", target="x", reason="spam")))
    assert red["reason"] == "spam" and red[SOURCE_KEY]["target"] == "x"


# ---------------------------------------------------------------- sink internals


def test_progress_line_moves_with_sends() -> None:
    """All commands can be fetched long before they are sent: sends alone must print."""
    lines: list[str] = []
    progress = progress_printer(lines.append, interval=0.0)
    stats = SinkStats(commands=2400)
    progress(stats)
    progress(stats)  # nothing moved: no line
    stats.count_send("net:p")
    progress(stats)
    assert len(lines) == 2 and "1 sent" in lines[1] and "net:p 1" in lines[1]


def test_txn_ids_deterministic() -> None:
    a = txn_id("!r:hs", "net:p", "m1", 0)
    assert a == txn_id("!r:hs", "net:p", "m1", 0)
    assert len({a, txn_id("!r2:hs", "net:p", "m1", 0), txn_id("!r:hs", "net:p", "m1", 1)}) == 3


def test_offset_tracker_commits_below_first_unfinished() -> None:
    tp = TopicPartition("t", 0)
    tr = OffsetTracker()
    for o in (10, 11, 12, 13):
        tr.add(tp, o)
    tr.done(tp, 12)
    assert tr.positions() == {}
    tr.done(tp, 10)
    assert tr.positions() == {tp: 11}
    tr.done(tp, 11)
    assert tr.positions() == {tp: 13}
    assert tr.pending == 1
    tr.forget({tp})
    assert tr.pending == 0 and tr.positions() == {}


async def test_committer_commits_durable_positions_once() -> None:
    """The runtime commits what the task's flush() says, skips repeats and unowned partitions."""
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    commits: list[dict[TopicPartition, int]] = []

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return {tp}

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            commits.append(dict(offsets))

    class Task:
        positions: dict[TopicPartition, int] = {}

        def flush(self) -> dict[TopicPartition, int]:
            return dict(self.positions)

    task = Task()
    committer = Committer(Consumer(), task)  # type: ignore[arg-type]
    task.positions = {tp: 11, other: 5}
    await committer.commit()
    await committer.commit()  # nothing new: no second commit
    task.positions = {tp: 13, other: 5}
    await committer.commit()
    assert commits == [{tp: 11}, {tp: 13}]


# ---------------------------------------------------------------- client
#
# The client against the real Synapse (session fixture) behind FaultProxy:
# every success is Synapse's own answer, faults are injected in front of it,
# and every claim about a room is checked by reading the room back directly
# from Synapse (not through the proxy).

TOKEN = "as-secret-token-123"  # only for the no-server test below
TS = 1_600_000_000_000
SEND = "/send/m.room.message/"


@dataclass
class Real:
    proxy: FaultProxy
    client: MatrixClient  # through the proxy: the client under test
    direct: MatrixClient  # straight to Synapse: setup and reading rooms back
    app: Appservice
    server_name: str

    @property
    def token(self) -> str:
        return self.app.as_token

    def ghost(self) -> tuple[str, str]:
        localpart = unique(f"{self.app.user_prefix}g")
        return localpart, f"@{localpart}:{self.server_name}"

    async def room_with_ghost(self) -> tuple[str, str]:
        """A real room (made directly) with a real ghost joined to it."""
        room, created = await self.direct.create_room(unique(f"{self.app.alias_prefix}r"))
        assert created
        localpart, ghost = self.ghost()
        assert await self.direct.register(localpart) is True
        await self.direct.invite(room, ghost)
        await self.direct.join(room, ghost)
        return room, ghost

    async def events_with_body(self, room: str, body: str) -> list[dict[str, Any]]:
        """Read the room back from Synapse: the m.room.message events with this body."""
        events = await self.direct.timeline(room, types=["m.room.message"])
        return [e for e in events if e["content"].get("body") == body]

    def assert_token_only_in_header(self) -> None:
        assert self.proxy.seen
        for seen in self.proxy.seen:
            assert self.token not in seen.path_qs
            assert quote(self.token, safe="") not in seen.path_qs
            assert seen.headers.get("Authorization") == f"Bearer {self.token}"


@pytest.fixture
async def real(synapse: Synapse, appservices: dict[str, Appservice]) -> AsyncIterator[Real]:
    app = appservices["free"]
    async with FaultProxy(synapse.url) as proxy:
        client = MatrixClient(
            proxy.url, app.as_token, synapse.server_name, app.sender_localpart, max_retry_delay=3.0
        )
        direct = MatrixClient(synapse.url, app.as_token, synapse.server_name, app.sender_localpart)
        try:
            yield Real(proxy, client, direct, app, synapse.server_name)
        finally:
            await client.close()
            await direct.close()


async def test_register_real_ghost_then_user_in_use(real: Real) -> None:
    localpart, ghost = real.ghost()
    assert await real.client.register(localpart) is True
    assert await real.client.register(localpart) is False  # Synapse's own M_USER_IN_USE
    registers = real.proxy.requests("/register", "POST")
    assert len(registers) == 2 and registers == real.proxy.forwarded
    # the ghost really exists: Synapse lets the appservice act as it
    who = await real.direct.get("account", "whoami", as_user=ghost)
    assert who["user_id"] == ghost
    real.assert_token_only_in_header()


async def test_create_room_twice_finds_it_by_alias(real: Real) -> None:
    localpart = unique(f"{real.app.alias_prefix}room")
    alias = f"#{localpart}:{real.server_name}"
    room, created = await real.client.create_room(localpart, name="Twice")
    assert created and room.startswith("!")
    # second call: Synapse answers M_ROOM_IN_USE, the client resolves the alias
    assert await real.client.create_room(localpart, name="Twice") == (room, False)
    assert len(real.proxy.requests("/createRoom", "POST")) == 2
    assert real.proxy.requests(f"/directory/room/{alias}", "GET")
    assert await real.direct.resolve_alias(alias) == room
    state = await real.direct.get("rooms", room, "state", "m.room.name", "")
    assert state["name"] == "Twice"
    real.assert_token_only_in_header()


async def test_429_waits_then_send_lands_once_with_ts(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    limit = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests"}
    # header wins over the body (5 s would exceed the 3 s cap and the time bound)
    real.proxy.inject(429, {**limit, "retry_after_ms": 5000}, {"Retry-After": "0.2"}, match=SEND)
    real.proxy.inject(429, {**limit, "retry_after_ms": 300}, match=SEND)  # body only
    body = unique("rate-limited ")
    started = time.monotonic()
    ev = await real.client.send(
        room,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        unique("txn"),
        as_user=ghost,
        ts=TS + 1,
    )
    assert 0.5 <= time.monotonic() - started < 2.5
    assert real.client.stats["rate_limited"] == 2 and real.client.stats["transient"] == 0
    sends = real.proxy.requests(SEND, "PUT")
    assert len(sends) == 3 and len({s.path_qs for s in sends}) == 1
    assert [s for s in real.proxy.forwarded if SEND in unquote(s.path_qs)] == sends[2:]
    query = parse_qs(urlsplit(sends[-1].path_qs).query)
    assert query == {"user_id": [ghost], "ts": [str(TS + 1)]}
    events = await real.events_with_body(room, body)
    assert [(e["event_id"], e["sender"], e["origin_server_ts"]) for e in events] == [
        (ev, ghost, TS + 1)
    ]
    real.assert_token_only_in_header()


async def test_502_503_504_retried_then_lands_once(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    for status in (502, 503, 504):
        real.proxy.inject(
            status, {"errcode": "M_UNKNOWN", "error": f"gateway {status}"}, match=SEND
        )
    body = unique("after-5xx ")
    ev = await real.client.send(
        room,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        unique("txn"),
        as_user=ghost,
        ts=TS + 2,
    )
    assert real.client.stats["transient"] == 3 and real.proxy.pending_faults == 0
    assert len(real.proxy.requests(SEND, "PUT")) == 4
    events = await real.events_with_body(room, body)
    assert [(e["event_id"], e["origin_server_ts"]) for e in events] == [(ev, TS + 2)]
    real.assert_token_only_in_header()


async def test_lost_reply_retried_with_same_txn_lands_once(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    real.proxy.drop_response_once(match=SEND)  # Synapse stores it; the client sees 502
    body = unique("lost-reply ")
    ev = await real.client.send(
        room,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        unique("txn"),
        as_user=ghost,
        ts=TS + 3,
    )
    sends = real.proxy.requests(SEND, "PUT")
    # both attempts reached Synapse with the same txn id; it deduplicated the second
    assert len(sends) == 2 and sends[0].path_qs == sends[1].path_qs
    assert [s for s in real.proxy.forwarded if SEND in unquote(s.path_qs)] == sends
    events = await real.events_with_body(room, body)
    assert [(e["event_id"], e["origin_server_ts"]) for e in events] == [(ev, TS + 3)]
    real.assert_token_only_in_header()


async def test_lost_reply_settled_from_the_room(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    real.proxy.drop_response_once(match=SEND)
    body = unique("settled ")
    calls: list[str | None] = []

    async def settle() -> str | None:
        found = await real.events_with_body(room, body)
        calls.append(found[0]["event_id"] if found else None)
        return found[0]["event_id"] if found else None

    ev = await real.client.send(
        room,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        unique("txn"),
        as_user=ghost,
        ts=TS + 4,
        settle=settle,
    )
    assert calls == [ev]  # the hook found the event the lost reply was about
    assert len(real.proxy.requests(SEND, "PUT")) == 1  # so no resend at all
    events = await real.events_with_body(room, body)
    assert [(e["event_id"], e["origin_server_ts"]) for e in events] == [(ev, TS + 4)]
    real.assert_token_only_in_header()


async def test_real_forbidden_is_permanent_and_not_retried(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    body = unique("forbidden ")
    bots = await real.direct.send(
        room, "m.room.message", {"msgtype": "m.text", "body": body}, unique("txn")
    )
    # A ghost (power level 0) may not redact the bot's event: Synapse's own M_FORBIDDEN.
    with pytest.raises(MatrixRequestError) as info:
        await real.client.redact(room, bots, unique("txn"), {}, as_user=ghost)
    assert (info.value.http_status, info.value.errcode) == (403, "M_FORBIDDEN")
    assert len(real.proxy.requests("/redact/", "PUT")) == 1
    assert real.client.stats["transient"] == 0 and real.client.stats["rate_limited"] == 0
    assert [e["event_id"] for e in await real.events_with_body(room, body)] == [bots]
    real.assert_token_only_in_header()


async def test_error_text_is_scrubbed_of_the_token(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    real.proxy.inject(400, {"errcode": "M_BAD_JSON", "error": f"bad {real.token}"}, match=SEND)
    body = unique("bad ")
    with pytest.raises(MatrixRequestError) as info:
        await real.client.send(
            room,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            unique("txn"),
            as_user=ghost,
        )
    assert (info.value.http_status, info.value.errcode) == (400, "M_BAD_JSON")
    assert real.token not in str(info.value) and "***" in str(info.value)
    assert real.token not in repr(info.value) and real.token not in (info.value.message or "")
    assert len(real.proxy.requests(SEND, "PUT")) == 1
    assert await real.events_with_body(room, body) == []
    real.assert_token_only_in_header()


async def test_500_retried_a_few_times_then_permanent(real: Real) -> None:
    room, ghost = await real.room_with_ghost()
    real.client.max_retry_delay = 0.05
    real.proxy.inject(500, {"errcode": "M_UNKNOWN", "error": "boom"}, times=10, match=SEND)
    body = unique("five-hundred ")
    with pytest.raises(MatrixRequestError) as info:
        await real.client.send(
            room,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            unique("txn"),
            as_user=ghost,
        )
    assert info.value.http_status == 500
    assert len(real.proxy.requests(SEND, "PUT")) == 1 + MAX_500_RETRIES
    assert await real.events_with_body(room, body) == []


async def test_token_only_in_authorization_header_on_every_endpoint(real: Real) -> None:
    client = real.client
    assert (await client.versions())["user_id"] == client.bot
    localpart, ghost = real.ghost()
    await client.register(localpart)
    await client.set_displayname(ghost, "Ghost")
    room, _ = await client.create_room(unique(f"{real.app.alias_prefix}ep"), invite=[ghost])
    await client.join(room, ghost)
    assert ghost in await client.joined_members(room)
    mxc = await client.upload(b"png-ish bytes", "image/png", "a b.png")
    assert await client.download(mxc) == b"png-ish bytes"
    ev = await client.send(
        room, "m.room.message", {"msgtype": "m.text", "body": "e"}, "t1", as_user=ghost, ts=TS + 6
    )
    await client.redact(room, ev, "t2", {"reason": "r"}, as_user=ghost)
    assert [e["event_id"] for e in await client.timeline(room, types=["m.room.message"])] == [ev]
    assert len(real.proxy.seen) >= 12
    real.assert_token_only_in_header()


async def test_connection_errors_retry_then_unreachable() -> None:
    client = MatrixClient("http://127.0.0.1:9", TOKEN, "hs", "bot", max_retry_delay=0.1)
    try:
        with pytest.raises(MatrixUnreachable) as info:
            await client.versions()
        assert TOKEN not in str(info.value)
        task = asyncio.create_task(client.send("!r:hs", "m.room.message", {}, "t"))
        await asyncio.sleep(0.5)
        assert not task.done() and client.stats["transient"] >= 2  # still retrying
        task.cancel()
        with pytest.raises(MediaError, match="file"):
            await client.fetch_url("file:///etc/passwd")
    finally:
        await client.close()


# ---------------------------------------------------------------- media (SSRF)


@pytest.mark.parametrize(
    "address, public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
    ],
)
def test_media_policy_refuses_non_public(address: str, public: bool) -> None:
    assert MediaPolicy().address_allowed(address) is public


def test_media_policy_allow_list() -> None:
    policy = MediaPolicy.parse("Media.LAN, 10.2.0.0/16", 10, 1.0)
    assert policy.host_allowed("media.lan") and policy.address_allowed("10.2.3.4")
    assert not policy.address_allowed("10.3.0.1")
    with pytest.raises(ValueError):
        MediaPolicy.parse("10.0.0.0/99", 10, 1.0)


async def test_fetch_url_checks_address_redirects_size_and_time() -> None:

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100, content_type="image/png")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{port}/ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(body=b"late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/hop", hop)
    app.router.add_get("/slow", slow)
    runner, port = await _serve(app)

    async def fetch(url: str, policy: MediaPolicy) -> tuple[bytes, str]:
        session = media_session(policy)
        try:
            return await fetch_url(session, url, policy)
        finally:
            await session.close()

    try:
        default = MediaPolicy()
        for url in (f"http://127.0.0.1:{port}/ok", f"http://localhost:{port}/ok"):
            with pytest.raises(MediaError, match="not a public address"):
                await fetch(url, default)  # IP literal, and a name resolving to loopback
        trusted = MediaPolicy(allow=("localhost",), max_bytes=1000, timeout_s=1.0)
        assert await fetch(f"http://localhost:{port}/ok", trusted) == (b"x" * 100, "image/png")
        # An allowed host redirecting to a refused address: refused after the redirect.
        with pytest.raises(MediaError, match="not a public address"):
            await fetch(f"http://localhost:{port}/hop", trusted)
        small = MediaPolicy(allow=("localhost",), max_bytes=10, timeout_s=1.0)
        with pytest.raises(MediaError, match="larger than 10 bytes"):
            await fetch(f"http://localhost:{port}/ok", small)
        quick = MediaPolicy(allow=("localhost",), timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(MediaError, match="cannot fetch"):
            await fetch(f"http://localhost:{port}/slow", quick)
        assert time.monotonic() - started < 20  # 5 bounded attempts with backoff
    finally:
        await runner.cleanup()


async def test_room_creation_gives_the_slot_back_while_rate_limited() -> None:
    """Inside room_slot every call holds the slot on the wire only: a 429 on
    createRoom leaves it free for other rooms during Retry-After."""
    calls = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response(
                {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"},
                status=429,
                headers={"Retry-After": "1"},
            )
        return web.json_response({"room_id": "!new:hs"})

    async def register(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/_matrix/client/v3/createRoom", create)
    app.router.add_post("/_matrix/client/v3/register", register)  # the bot's intent
    runner, port = await _serve(app)
    client = MatrixClient(f"http://127.0.0.1:{port}", TOKEN, "hs", "bot")
    slot = asyncio.Semaphore(1)
    try:
        with room_slot(slot):
            task = asyncio.create_task(client.create_room("p1"))
        deadline = time.monotonic() + 5
        while calls < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not task.done() and not slot.locked()  # waiting, slot free for others
        async with slot:  # another room can take it meanwhile
            pass
        assert await task == ("!new:hs", True) and calls == 2
        # The slot is held while a request is on the wire.
        with room_slot(slot):
            async with slot:
                blocked = asyncio.create_task(client.create_room("p2"))
                await asyncio.sleep(0.2)
                assert calls == 2 and not blocked.done()
            assert await blocked == ("!new:hs", True) and calls == 3
    finally:
        await client.close()
        await runner.cleanup()


async def test_429_gives_the_room_slot_back_while_waiting() -> None:
    """A rate-limited request does not hold the concurrency slot during Retry-After."""

    calls = 0

    async def limited(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response(
                {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"},
                status=429,
                headers={"Retry-After": "1"},
            )
        return web.json_response({"event_id": "$e"})

    async def state(request: web.Request) -> web.Response:
        # mautrix's intent checks the sender's power level before a send
        if request.match_info["type"] == "m.room.power_levels":
            return web.json_response({"users_default": 0, "events_default": 0})
        return web.json_response(
            {"type": "m.room.create", "state_key": "", "content": {"room_version": "10"}}
            | {"sender": "@bot:hs", "event_id": "$c", "room_id": "!r:hs", "origin_server_ts": 1}
        )

    app = web.Application()
    app.router.add_put("/_matrix/client/v3/rooms/{room}/send/{type}/{txn}", limited)
    app.router.add_get("/_matrix/client/v3/rooms/{room}/state/{type}/", state)
    # and, acting as the bot in a room it does not know it is in, registers and joins it
    async def register(_: web.Request) -> web.Response:
        return web.json_response({})

    async def join(_: web.Request) -> web.Response:
        return web.json_response({"room_id": "!r:hs"})

    app.router.add_post("/_matrix/client/v3/register", register)
    app.router.add_post("/_matrix/client/v3/join/{room}", join)
    runner, port = await _serve(app)
    client = MatrixClient(f"http://127.0.0.1:{port}", TOKEN, "hs", "bot")
    slot = asyncio.Semaphore(1)
    try:
        task = asyncio.create_task(client.send("!r:hs", "m.room.message", {}, "t", slot=slot))
        deadline = time.monotonic() + 5
        while calls < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not task.done() and not slot.locked()  # waiting, slot free for others
        async with slot:  # another room can take it meanwhile
            pass
        assert await task == "$e" and client.stats["rate_limited"] == 1
    finally:
        await client.close()
        await runner.cleanup()


async def test_state_store_forgets_the_oldest_rooms_and_ghosts_past_its_caps() -> None:
    """mautrix's memory store would keep every room and ghost the sink ever saw."""
    from mautrix.types import Membership, PowerLevelStateEventContent

    from connectors.matrix.state_store import BoundedStateStore

    store = BoundedStateStore(max_rooms=2, max_users=2)
    create = {"type": "m.room.create", "state_key": "", "sender": "@a:hs", "content": {}}
    create |= {"event_id": "$c", "origin_server_ts": 1}
    for n in (1, 2, 3):
        room = f"!r{n}:hs"
        await store.set_power_levels(room, PowerLevelStateEventContent())
        await store.set_membership(room, "@g:hs", Membership.JOIN)
        await store.set_create(create | {"room_id": room})
        await store.registered(f"@g{n}:hs")
    # Upstream keeps each room in these maps; if it moves them, this fails.
    for name in store._ROOM_MAPS:
        assert isinstance(getattr(store, name), dict), name
    kept = {"!r2:hs", "!r3:hs"}
    assert set(store.power_levels) == set(store.members) == set(store.create) == kept
    assert not await store.has_power_levels_cached("!r1:hs")
    assert not await store.is_joined("!r1:hs", "@g:hs")
    assert await store.is_joined("!r3:hs", "@g:hs")
    assert await store.has_create_cached("!r3:hs")
    assert [await store.is_registered(f"@g{n}:hs") for n in (1, 2, 3)] == [False, True, True]


async def test_a_forgotten_room_costs_a_join_that_adds_no_event(real: Real) -> None:
    """What BoundedStateStore forgets (or a restarted sink never knew) is learnt
    again by a register and a join; Synapse answers an existing ghost with
    M_USER_IN_USE and an already-joined one without a new member event."""
    room, ghost = await real.room_with_ghost()
    before = await real.direct.timeline(room, types=["m.room.member"])
    body = unique("after forgetting ")
    # A client with an empty state store: it knows neither the room nor the ghost.
    async with MatrixClient(
        real.direct.base_url, real.app.as_token, real.server_name, real.app.sender_localpart
    ) as fresh:
        assert await fresh.register(ghost[1:].split(":")[0]) is False
        await fresh.join(room, ghost)
        await fresh.send(
            room, "m.room.message", {"msgtype": "m.text", "body": body}, unique("t"), as_user=ghost
        )
    after = await real.direct.timeline(room, types=["m.room.member"])
    assert [e["event_id"] for e in after] == [e["event_id"] for e in before]
    assert len(await real.events_with_body(room, body)) == 1

"""Pure parts of the sink (ids, content, registration, offsets) and the client's
retry policy against a scripted fake homeserver. No Synapse needed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiokafka import TopicPartition

from connectors.matrix.client import MatrixClient, MatrixError, MatrixUnreachable, MediaError
from connectors.matrix.content import SOURCE_KEY, build_content, redaction_content, sanitize_html
from connectors.matrix.ghosts import (
    alias_localpart,
    escape,
    ghost_localpart,
    ghost_user_id,
    parse_ghost,
    unescape,
)
from connectors.matrix.registration import RegistrationError, literal_prefix, load_registration
from connectors.matrix.sink import OffsetTracker, txn_id
from topics.records import Content, NetworkMessage, Sender

ALLOWED = set("abcdefghijklmnopqrstuvwxyz0123456789._=-/")

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
    ],
)
def test_sanitize_html(html: str, clean: str) -> None:
    assert sanitize_html(html) == clean


def test_text_kinds_and_source() -> None:
    t, c = build_content(msg(Content(kind="text", body="hi", html="<b>hi</b>")))
    assert t == "m.room.message"
    assert c == {
        "msgtype": "m.text",
        "body": "hi",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>hi</b>",
        SOURCE_KEY: {"network": "net", "portal": "p", "id": "m1", "part": 0},
    }
    assert build_content(msg(Content(kind="notice", body="n")))[1]["msgtype"] == "m.notice"
    assert build_content(msg(Content(kind="emote", body="e")))[1]["msgtype"] == "m.emote"
    # HTML that sanitizes to nothing is left out
    assert "format" not in build_content(msg(Content(kind="text", body="x", html="<script>")))[1]


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
    t, c = build_content(msg(media), mxc="mxc://hs/v", media_size=1234)
    assert c["msgtype"] == "m.video" and c["url"] == "mxc://hs/v" and c["filename"] == "c.mp4"
    assert c["info"] == {
        "mimetype": "video/mp4",
        "size": 1234,
        "w": 640,
        "h": 480,
        "duration": 1500,
    }
    with pytest.raises(ValueError):
        build_content(msg(media))
    _, c = build_content(msg(Content(kind="location", lat=1.5, lon=-2.0)))
    assert c["msgtype"] == "m.location" and c["geo_uri"] == "geo:1.5,-2.0"
    _, c = build_content(msg(Content(kind="text", body="r"), reply_to="x"), reply_event="$r")
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$r"}}
    _, c = build_content(msg(Content(kind="text", body="t"), thread="x"), thread_root="$root")
    assert c["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$root"},
    }
    _, c = build_content(
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
    t, c = build_content(msg(Content(kind="reaction", target="x", key="👍")), target_event="$o")
    assert t == "m.reaction"
    assert c["m.relates_to"] == {"rel_type": "m.annotation", "event_id": "$o", "key": "👍"}
    with pytest.raises(ValueError):
        build_content(msg(Content(kind="reaction", target="x", key="k")))
    red = redaction_content(msg(Content(kind="redaction", target="x", reason="spam")))
    assert red["reason"] == "spam" and red[SOURCE_KEY]["target"] == "x"


# ---------------------------------------------------------------- sink internals


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
    assert tr.to_commit() == {}
    tr.done(tp, 10)
    assert tr.to_commit() == {tp: 11}
    tr.committed({tp: 11})
    assert tr.to_commit() == {}
    tr.done(tp, 11)
    assert tr.to_commit() == {tp: 13}
    assert tr.pending == 1
    tr.forget({tp})
    assert tr.pending == 0 and tr.to_commit() == {}


# ---------------------------------------------------------------- client


TOKEN = "as-secret-token-123"


class FakeHS:
    """Scripted responses per path; records what it received."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict, dict]] = []
        self.seen: list[web.Request] = []
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        self.bodies.append(await request.read())
        status, body, headers = (
            self.script.pop(0) if self.script else (200, {"event_id": "$ok"}, {})
        )
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def fake_hs():
    hs = FakeHS()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hs.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = MatrixClient(f"http://127.0.0.1:{port}", TOKEN, "hs", "bot", max_retry_delay=0.3)
    yield hs, client
    await client.close()
    await runner.cleanup()


async def test_send_url_headers_and_429(fake_hs) -> None:
    hs, client = fake_hs
    hs.script = [
        (429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 5000}, {"Retry-After": "0.2"}),
        (429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 100}, {}),
        (200, {"event_id": "$e"}, {}),
    ]
    started = time.monotonic()
    ev = await client.send(
        "!r:hs", "m.room.message", {"body": "x"}, "txn1", as_user="@g:hs", ts=1_600_000_000_000
    )
    assert ev == "$e" and 0.3 <= time.monotonic() - started < 2
    req = hs.seen[-1]
    assert req.path == "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/txn1"
    assert req.query["user_id"] == "@g:hs" and req.query["ts"] == "1600000000000"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert all(TOKEN not in str(r.url) for r in hs.seen)
    assert client.stats["rate_limited"] == 2


async def test_5xx_retries_with_backoff_and_settle(fake_hs) -> None:
    hs, client = fake_hs
    hs.script = [(502, {}, {}), (503, {}, {}), (200, {"event_id": "$e"}, {})]
    assert await client.send("!r:hs", "m.room.message", {}, "t") == "$e"
    assert len(hs.seen) == 3
    # a settle hook that finds the event stops the retries
    hs.script = [(504, {}, {})]
    calls = []

    async def settle():
        calls.append(1)
        return {"event_id": "$found"}

    assert await client.send("!r:hs", "m.room.message", {}, "t2", settle=settle) == "$found"
    assert calls == [1]


async def test_permanent_errors_carry_errcode_without_token(fake_hs) -> None:
    hs, client = fake_hs
    hs.script = [(400, {"errcode": "M_BAD_JSON", "error": f"bad {TOKEN}"}, {})]
    with pytest.raises(MatrixError) as info:
        await client.send("!r:hs", "m.room.message", {}, "t")
    assert info.value.errcode == "M_BAD_JSON" and info.value.status == 400
    assert TOKEN not in str(info.value) and "***" in str(info.value)
    hs.script = [(500, {"errcode": "M_UNKNOWN"}, {})] * 10
    with pytest.raises(MatrixError):
        await client.send("!r:hs", "m.room.message", {}, "t")


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


async def test_register_and_room_in_use(fake_hs) -> None:
    hs, client = fake_hs
    hs.script = [(400, {"errcode": "M_USER_IN_USE", "error": "taken"}, {})]
    assert await client.register("_bf_x") is False
    hs.script = [
        (400, {"errcode": "M_ROOM_IN_USE", "error": "alias taken"}, {}),
        (200, {"room_id": "!existing:hs"}, {}),
    ]
    assert await client.create_room("_bf_net_p") == ("!existing:hs", False)
    assert hs.seen[-1].path == "/_matrix/client/v3/directory/room/#_bf_net_p:hs"

"""Unit tests for the record codec: round trips and precise errors."""

import orjson
import pytest

from topics.codec import RecordError, decode, encode
from topics.records import MAX_TS, MIN_TS, Content, NetworkMessage, Sender, SendMessage

TS = 1_700_000_000_000


def msg(**over):
    base = {
        "type": "message",
        "network": "demo",
        "portal": "family",
        "id": "m1",
        "sender": {"id": "alice", "name": "Alice"},
        "ts": TS,
        "content": {"kind": "text", "body": "hello"},
    }
    base.update(over)
    return orjson.dumps(base)


def test_round_trip_every_kind():
    contents = [
        Content(kind="text", body="hi", html="<b>hi</b>"),
        Content(kind="notice", body="n"),
        Content(kind="emote", body="waves"),
        Content(kind="media", media_type="image", body="cat.jpg", url="mxc://x/y", size=3),
        Content(kind="location", lat=52.5, lon=13.4, body="Berlin"),
        Content(kind="reaction", target="m0", key="👍"),
        Content(kind="edit", target="m0", body="fixed"),
        Content(kind="redaction", target="m0"),
    ]
    for content in contents:
        m = NetworkMessage("demo", "p", "m1", Sender("a"), TS, content, reply_to="m0")
        assert decode(encode(m)) == m
        cmd = SendMessage(m)
        assert decode(encode(cmd)) == cmd


def test_defaults():
    m = decode(msg())
    assert m.history is True and m.part == 0 and m.key == "demo:family"


@pytest.mark.parametrize(
    ("over", "field", "reason"),
    [
        ({"ts": "yesterday"}, "ts", "expected an integer, got string"),
        ({"ts": 1_700_000_000}, "ts", "not Unix milliseconds"),
        ({"id": None}, "id", "missing"),
        ({"sender": {"name": "x"}}, "sender.id", "missing"),
        ({"content": {"kind": "poll"}}, "content.kind", "unknown kind 'poll'"),
        ({"content": {"kind": "text"}}, "content.body", "missing"),
        ({"content": {"kind": "media", "media_type": "image"}}, "content.url", "either"),
        (
            {"content": {"kind": "media", "media_type": "image", "url": "file:///etc/passwd"}},
            "content.url",
            "http(s):// or mxc://",
        ),
        ({"sender": {"id": "a", "avatar_url": "gopher://x"}}, "sender.avatar_url", "http(s)"),
        ({"network": "Bad Net"}, "network", "lowercase"),
        ({"history": "yes"}, "history", "expected true or false"),
        ({"type": "nope"}, "type", "unknown record type"),
    ],
)
def test_errors_name_field_and_reason(over, field, reason):
    with pytest.raises(RecordError) as info:
        decode(msg(**over))
    assert info.value.field == field
    assert reason in info.value.reason


def test_invalid_json_and_oversize():
    with pytest.raises(RecordError, match="invalid JSON"):
        decode(b"{nope")
    with pytest.raises(RecordError, match="over the"):
        decode(b" " * 1_000_000)
    with pytest.raises(RecordError, match="expected a JSON object"):
        decode(b"[1]")


# ---------------------------------------------------------------- message fast path
#
# codec._fast_message handles the common message shapes inline and returns None
# for anything else, falling back to the generic _Obj walk. Every variant below
# must decode to an equal record, or fail with the same field and reason, on
# both paths.

LONG_ID = "i" * 255


def _generic(obj):
    """The generic parser's outcome for a message dict: the record or (field, reason)."""
    from topics.schema import _message, _Obj

    try:
        return _message(_Obj(obj, ""))
    except RecordError as exc:
        return (exc.field, exc.reason)


def _decoded(data):
    try:
        return decode(data)
    except RecordError as exc:
        return (exc.field, exc.reason)


def _base():
    return orjson.loads(msg())


def _variants():
    """(label, message dict) pairs: valid shapes, then one defect at a time."""
    values = [
        None,
        "",
        "x",
        LONG_ID,
        LONG_ID + "i",
        "x" * 65_536,
        "x" * 65_537,
        0,
        -1,
        1.5,
        True,
        False,
        [],
        {},
        TS,
    ]
    contents = [
        {"kind": "text", "body": "hi"},
        {"kind": "text", "body": "hi", "html": "<b>hi</b>"},
        {"kind": "notice", "body": "n"},
        {"kind": "emote", "body": "waves", "html": None},
        {"kind": "reaction", "target": "m0", "key": "👍"},
        {"kind": "edit", "target": "m0", "body": "fixed", "html": "<i>fixed</i>"},
        {"kind": "redaction", "target": "m0"},
        {"kind": "redaction", "target": "m0", "reason": "spam"},
        {"kind": "media", "media_type": "image", "url": "mxc://x/y", "size": 3},
        {"kind": "location", "lat": 52.5, "lon": 13.4},
        {"kind": "poll"},
        {"kind": None},
        {"kind": 3, "body": "x"},
        {"kind": "text"},
        {"kind": "text", "body": ""},
        {"kind": "text", "body": 5},
        {"kind": "text", "body": "x" * 65_537},
        {"kind": "text", "body": "x", "html": 5},
        {"kind": "text", "body": "x", "html": "x" * 65_537},
        {"kind": "reaction", "target": "m0"},
        {"kind": "reaction", "target": "m0", "key": ""},
        {"kind": "reaction", "target": "m0", "key": "k" * 256},
        {"kind": "reaction", "target": "", "key": "k"},
        {"kind": "reaction", "key": "k"},
        {"kind": "edit", "target": "m0"},
        {"kind": "edit", "target": LONG_ID + "i", "body": "x"},
        {"kind": "redaction", "target": "m0", "reason": "r" * 1025},
        {"kind": "redaction", "target": "m0", "reason": 7},
    ]
    senders = [
        {"id": "alice"},
        {"id": "alice", "name": "Alice", "avatar_url": "mxc://a/b"},
        {"id": "alice", "name": ""},
        {"id": "alice", "name": "n" * 255},
        {"id": "alice", "name": "n" * 256},
        {"id": "alice", "name": 5},
        {"id": "alice", "avatar_url": "x" * 65_537},
        {"id": "alice", "avatar_url": "https://example.org/a.png"},
        {"id": "alice", "avatar_url": "HTTP://example.org/a.png"},
        {"id": "alice", "avatar_url": "file:///etc/passwd"},
        {"id": "alice", "avatar_url": "https://x/a b"},
        {"id": "alice", "avatar_url": "https://" + "x" * 4096},
        {"id": "alice", "avatar_url": "/local/path.png"},
        {"id": ""},
        {"id": 7},
        {"name": "x"},
        {},
    ]
    networks = ["demo", "a", "a" * 64, "a" * 65, "Bad Net", "-x", "x.y_z-1", "demo\n", "ü"]
    yield "base", _base()
    for key in ("network", "portal", "id", "ts", "history", "part", "reply_to", "thread"):
        for value in values:
            yield f"{key}={value!r:.20}", {**_base(), key: value}
    for key in ("network", "portal", "id", "sender", "ts", "content"):
        obj = _base()
        del obj[key]
        yield f"no {key}", obj
    for value in networks:
        yield f"network={value!r}", {**_base(), "network": value}
    for value in [MIN_TS - 1, MIN_TS, MAX_TS - 1, MAX_TS, float(TS), 3, 2**62, "1700000000000"]:
        yield f"ts={value!r}", {**_base(), "ts": value}
    for value in (0, 3, -1, True, 2.0, "1"):
        yield f"part={value!r}", {**_base(), "part": value}
    for value in (True, False, 0, 1, "yes"):
        yield f"history={value!r}", {**_base(), "history": value}
    for content in contents:
        yield f"content={content}", {**_base(), "content": content}
    for value in (None, "text", [], 5):
        yield f"content={value!r}", {**_base(), "content": value}
    for sender in senders:
        yield f"sender={sender}", {**_base(), "sender": sender}
    for value in (None, "alice", [], 5):
        yield f"sender={value!r}", {**_base(), "sender": value}
    yield "extra fields", {**_base(), "extra": 1, "reply_to": "m0", "thread": "t1"}
    yield (
        "every optional",
        {
            **_base(),
            "reply_to": "",
            "thread": LONG_ID,
            "history": False,
            "part": 2,
            "sender": {"id": "a", "name": None, "avatar_url": None},
        },
    )


@pytest.mark.parametrize(
    ("label", "obj"), list(_variants()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_fast_path_matches_generic(label, obj):
    from topics.codec import _fast_message

    expected = _generic(obj)
    fast = _fast_message(obj)
    if fast is not None:
        # Accepted by the fast path: valid for the generic one, and the same record.
        assert not isinstance(expected, tuple), expected
        assert fast == expected and repr(fast) == repr(expected)
    got = _decoded(orjson.dumps(obj))
    assert got == expected
    assert repr(got) == repr(expected)  # same types too (True vs 1, int vs float)
    # Wrapped in a send command, errors are named under "message.".
    cmd = _decoded(orjson.dumps({"type": "send", "message": obj, "seq": 4}))
    if isinstance(expected, tuple):
        assert cmd == (f"message.{expected[0]}", expected[1])
    else:
        assert cmd == SendMessage(expected, seq=4)


def test_fast_path_takes_the_common_shapes():
    """The fast path is actually used for text, reactions, edits and redactions."""
    from topics.codec import _fast_message

    for content in (
        {"kind": "text", "body": "hi", "html": "<b>hi</b>"},
        {"kind": "notice", "body": "n"},
        {"kind": "emote", "body": "e"},
        {"kind": "reaction", "target": "m0", "key": "k"},
        {"kind": "edit", "target": "m0", "body": "b"},
        {"kind": "redaction", "target": "m0", "reason": "r"},
    ):
        obj = {**_base(), "content": content, "reply_to": "m0", "part": 1, "history": False}
        assert _fast_message(obj) is not None, content
        assert _fast_message(obj) == _generic(obj)
    # Anything unusual goes to the generic path.
    assert _fast_message({**_base(), "content": {"kind": "media", "url": "mxc://x"}}) is None
    assert _fast_message({**_base(), "ts": "soon"}) is None


@pytest.mark.parametrize(
    "send",
    [
        {"seq": 7},
        {"seq": 0},
        {},  # no seq: 0
        {"seq": -1},
        {"seq": True},
        {"seq": "7"},
        {"seq": 7, "message": {"type": "portal", "network": "wa", "portal": "p"}},
        {"seq": 7, "message": "not an object"},
    ],
    ids=repr,
)
def test_send_fast_path_agrees_with_the_generic_parser(send: dict) -> None:
    from topics.codec import _fast_send
    from topics.schema import _Obj, _send

    obj = {"type": "send", "message": _base(), **send}

    def generic():
        try:
            return _send(_Obj(obj, ""))
        except RecordError as exc:
            return (exc.field, exc.reason)

    fast = _fast_send(obj)
    if fast is not None:
        assert fast == generic()
    assert _decoded(orjson.dumps(obj)) == generic()

"""Unit tests for the record codec: round trips and precise errors."""

import orjson
import pytest

from topics.codec import RecordError, decode, encode
from topics.records import Content, NetworkMessage, Sender, SendMessage

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

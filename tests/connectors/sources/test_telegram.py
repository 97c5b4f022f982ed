"""Telegram Desktop export parsing: both shapes, entities, replies, service, media."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from connectors.conformance import by_id, run
from connectors.source import Rejected, SourceError
from connectors.sources.telegram import MAX_INLINE_BYTES, TelegramSource, entities_to_html
from tests.helpers import SAMPLES as SAMPLES_DIR
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

SAMPLES = SAMPLES_DIR / "telegram"
ALICE = Sender("user111", "Alice")
BOB = Sender("user222", "Bob")


def read(path: Path, **options: str) -> tuple[list, list[Rejected], TelegramSource]:
    return run(TelegramSource, path, **options)  # type: ignore[return-value]


def test_single_chat_export() -> None:
    records, rejected, source = read(SAMPLES / "single")
    assert records[0] == PortalInfo("telegram", "4242", name="Book Club")
    assert records[-1] == PortalInfo(
        "telegram",
        "4242",
        name="Book Club",
        members=(Member("user111", "Alice"), Member("user222", "Bob")),
    )
    msgs = by_id(records)
    created = msgs[("1", 0)]
    assert (created.sender, created.ts) == (ALICE, 1_704_058_800_000)
    assert created.content == Content(kind="notice", body="Alice created the group «Book Club»")
    hi = msgs[("2", 0)]
    assert hi.content == Content(
        kind="text",
        body="Hi all! See this <3",
        html='Hi <strong>all</strong>! See <a href="https://example.com/?a=1&amp;b=2">this</a>'
        " &lt;3",
    )
    reply = msgs[("3", 0)]
    assert (reply.sender, reply.reply_to, reply.content.body) == (BOB, "2", "plain reply")
    assert reply.content.html is None
    pinned = msgs[("8", 0)]
    assert (pinned.content.kind, pinned.reply_to) == ("notice", "2")
    assert pinned.content.body == "Bob pinned a message"
    loc = msgs[("9", 0)].content
    assert (loc.kind, loc.lat, loc.lon) == ("location", 52.52, 13.405)
    # No date_unixtime: the local date is read in option tz (UTC by default).
    assert msgs[("10", 0)].ts == 1_704_059_400_000
    assert [r.reason for r in rejected] == [
        "media path '../../outside.txt' points outside the export folder"
    ]
    assert source.stats["media"] == 1 and source.stats["media_missing"] == 1


def test_entities_to_html() -> None:
    records, _, _ = read(SAMPLES / "single" / "result.json")
    content = by_id(records)[("4", 0)].content
    assert content.body == "it del u secret x<y\nprint(1)\n@carol example.org quoted #tag"
    assert content.html == (
        "<em>it</em> <del>del</del> <u>u</u> <span data-mx-spoiler>secret</span> "
        '<code>x&lt;y</code><br><pre><code class="language-python">print(1)\n</code></pre>'
        '<a href="https://t.me/carol">@carol</a> <a href="https://example.org">example.org</a> '
        "<blockquote>quoted</blockquote> #tag"
    )
    # The older "text" array form (strings mixed with entity objects).
    assert entities_to_html(["a ", {"type": "bold", "text": "b"}, "\nc"]) == (
        "a b\nc",
        "a <strong>b</strong><br>c",
    )
    assert entities_to_html(["just text"]) == ("just text", None)


def test_media_from_the_export_folder() -> None:
    records, _, _ = read(SAMPLES / "single")
    msgs = by_id(records)
    photo = msgs[("5", 0)].content
    assert photo == Content(
        kind="media",
        media_type="image",
        body="sunset",
        filename="photo_1@31-12-2023_21-45-00.jpg",
        mimetype="image/jpeg",
        size=10,
        data=base64.b64encode(b"tiny jpeg\n").decode(),
        width=640,
        height=480,
    )
    # A file the export left out: a notice, then the caption as part 1.
    assert msgs[("6", 0)].content == Content(
        kind="notice",
        body="Video (big.mp4): not included in the export",
    )
    assert msgs[("6", 1)].content == Content(kind="text", body="the video")


def test_too_large_and_absolute_media(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "big.bin").write_bytes(b"x" * (MAX_INLINE_BYTES + 1))
    (tmp_path / "files" / "v.ogg").write_bytes(b"voice")
    base = {"type": "message", "date_unixtime": "1704059100", "from": "A", "from_id": "user1"}
    chat = {
        "name": "c",
        "id": 1,
        "messages": [
            {**base, "id": 1, "file": "files/big.bin", "text": ""},
            {**base, "id": 2, "file": "/etc/passwd", "text": ""},
            {
                **base,
                "id": 3,
                "file": "files/v.ogg",
                "media_type": "voice_message",
                "mime_type": "audio/ogg",
                "duration_seconds": 3,
                "text": "",
            },
        ],
    }
    (tmp_path / "result.json").write_text(json.dumps(chat))
    records, rejected, source = read(tmp_path)
    msgs = by_id(records)
    assert "too large" in msgs[("1", 0)].content.body
    assert source.stats["media_too_large"] == 1
    assert [r.where for r in rejected] == ["result.json:chat 1 message 2"]
    voice = msgs[("3", 0)].content
    assert (voice.media_type, voice.mimetype, voice.duration_ms) == ("audio", "audio/ogg", 3000)


def test_full_export_with_chat_list() -> None:
    records, rejected, _ = read(SAMPLES / "full")
    assert rejected == []
    portals = [(r.portal, r.name) for r in records if isinstance(r, PortalInfo)]
    assert portals == [
        ("222", "Bob"),
        ("222", "Bob"),
        ("111", "Saved Messages"),
        ("111", "Saved Messages"),
        ("333", "Old group"),
        ("333", "Old group"),
    ]
    msgs = [(r.portal, r.id, r.content.body) for r in records if isinstance(r, NetworkMessage)]
    assert msgs == [
        ("222", "100", "hey"),
        ("222", "101", "ho"),
        ("111", "1", "note to self"),
        ("333", "5", "bye"),
    ]
    only, _, _ = read(SAMPLES / "full", chats="333")
    assert {r.portal for r in only} == {"333"}


def test_timezone_option_for_local_dates() -> None:
    records, _, _ = read(SAMPLES / "single", tz="Europe/Berlin")
    assert by_id(records)[("10", 0)].ts == 1_704_059_400_000 - 3_600_000
    with pytest.raises(SourceError, match="unknown time zone"):
        read(SAMPLES / "single", tz="Nowhere/Else")


def test_broken_inputs(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        read(tmp_path)
    truncated = tmp_path / "result.json"
    text = (SAMPLES / "single" / "result.json").read_text()
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(SourceError, match=r"result\.json: invalid JSON"):
        read(truncated)
    (tmp_path / "result.json").write_text('{"about": "x", "chats": {"list": []}}')
    with pytest.raises(SourceError, match="no chats"):
        read(tmp_path)


def test_bad_message_is_rejected(tmp_path: Path) -> None:
    chat = {
        "name": "c",
        "id": 1,
        "messages": [
            {"id": "x", "type": "message"},
            {"id": 2, "type": "message", "from_id": "user1", "text": "no date"},
            {"id": 3, "type": "message", "date_unixtime": "1704059100", "text": "ok"},
        ],
    }
    (tmp_path / "result.json").write_text(json.dumps(chat))
    records, rejected, _ = read(tmp_path)
    assert len(rejected) == 2
    assert "integer id" in rejected[0].reason
    assert "date" in rejected[1].reason
    ok = by_id(records)[("3", 0)]
    assert ok.sender == Sender("chat1", "c")


def test_ids_stable_and_copy_of_export(tmp_path: Path) -> None:
    shutil.copytree(SAMPLES / "single", tmp_path / "copy")
    a = [(r.id, r.part) for r in read(SAMPLES / "single")[0] if isinstance(r, NetworkMessage)]
    b = [(r.id, r.part) for r in read(tmp_path / "copy")[0] if isinstance(r, NetworkMessage)]
    assert a == b and len(set(a)) == len(a)


_OK = {"id": 9, "type": "message", "date_unixtime": "1704059100", "from_id": "user1", "text": "ok"}


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"text": 5}, "'text'"),
        ({"text": [{"type": "text_link", "text": "a", "href": 3}]}, "'text[0].href'"),
        ({"text": [{"type": "pre", "text": "a", "language": {}}]}, "'text[0].language'"),
        ({"mime_type": 1, "file": "files/x"}, "'mime_type'"),
        ({"title": ["t"]}, "'title'"),
        ({"type": "service", "action": 4, "actor_id": "user1"}, "'action'"),
        (
            {"location_information": {"latitude": "north", "longitude": 1}},
            "location_information.latitude'",
        ),
        ({"photo": "files/a\u0000.jpg"}, "NUL"),
        ({"text_entities": "plain"}, "'text_entities'"),
    ],
)
def test_message_of_the_wrong_shape_is_one_rejection(
    tmp_path: Path, fields: dict, field: str
) -> None:
    bad = {"id": 2, "type": "message", "date_unixtime": "1704059000", "from_id": "user1"}
    bad.update(fields)
    chat = {"name": "c", "id": 1, "messages": [bad, _OK]}
    (tmp_path / "result.json").write_text(json.dumps(chat))
    records, rejected, _ = read(tmp_path)
    assert len(rejected) == 1, rejected
    assert rejected[0].where.endswith("message 2")
    assert field in rejected[0].reason
    assert by_id(records)[("9", 0)].content.body == "ok"


def test_deeply_nested_message_is_skipped_not_a_crash(tmp_path: Path) -> None:
    deep = '{"id": 2, "type": "message", "text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    text = '{"name": "c", "id": 1, "messages": [' + deep + ", " + json.dumps(_OK) + "]}"
    (tmp_path / "result.json").write_text(text)
    records, rejected, _ = read(tmp_path)
    assert len(rejected) == 1
    assert "deeper than" in rejected[0].reason
    assert by_id(records)[("9", 0)].content.body == "ok"


@pytest.mark.parametrize("name", ['{"x": 1}', "[1]", "7"])
def test_chat_name_of_the_wrong_type_is_not_used(tmp_path: Path, name: str) -> None:
    text = '{"name": ' + name + ', "id": 1, "messages": [' + json.dumps(_OK) + "]}"
    (tmp_path / "result.json").write_text(text)
    records, rejected, _ = read(tmp_path)
    assert rejected == []
    assert by_id(records)[("9", 0)].content.body == "ok"
    assert all(not isinstance(r.name, dict | list | int) for r in records if hasattr(r, "name"))


def _message(**fields: object) -> dict:
    """A message entry of an export, from user1 "A" on 2024-01-01, with ``fields`` on top."""
    base = {"id": 1, "type": "message", "date_unixtime": "1704058800", "from": "A"}
    return {**base, "from_id": "user1", "text": "", **fields}


def _export(tmp_path: Path, chat: dict) -> Path:
    path = tmp_path / "result.json"
    path.write_text(json.dumps(chat), encoding="utf-8")
    return path


_NOT_INCLUDED = "(File not included. Change data exporting settings to download.)"


@pytest.mark.parametrize(
    "fields, notice",
    [
        ({"photo": _NOT_INCLUDED, "width": 1280, "height": 720}, "Photo (1280×720)"),
        (
            {"file": _NOT_INCLUDED, "media_type": "sticker", "sticker_emoji": "😀"},
            "Sticker (😀)",
        ),
        (
            {"file": _NOT_INCLUDED, "media_type": "voice_message", "duration_seconds": 7},
            "Voice message (7 s)",
        ),
    ],
)
def test_media_left_out_of_the_export_says_what_it_was(
    tmp_path: Path, fields: dict, notice: str
) -> None:
    message = _message(**fields)
    chat = {"name": "c", "type": "private_group", "id": 9, "messages": [message]}
    records, rejected, _ = read(_export(tmp_path, chat))
    assert rejected == []
    (m,) = [r for r in records if isinstance(r, NetworkMessage)]
    assert m.content == Content(kind="notice", body=f"{notice}: not included in the export")
    assert "Change data exporting settings" not in m.content.body


def test_forum_topic_titles_are_kept(tmp_path: Path) -> None:
    created = _message(
        type="service", actor="A", actor_id="user1", action="topic_created", title="Travel"
    )
    renamed = {**created, "id": 2, "action": "topic_edit", "new_title": "Trips"}
    del renamed["title"]
    chat = {"name": "forum", "type": "public_supergroup", "id": 9, "messages": [created, renamed]}
    records, _, _ = read(_export(tmp_path, chat))
    bodies = [r.content.body for r in records if isinstance(r, NetworkMessage)]
    assert bodies == ["A created the topic «Travel»", "A renamed the topic to «Trips»"]


def test_chat_without_an_id_is_one_rejection_and_the_others_import(tmp_path: Path) -> None:
    message = _message(text="hi")
    full = {
        "chats": {
            "list": [
                {"name": "lost", "type": "private_chat", "messages": [message]},
                {"name": "kept", "type": "private_chat", "id": 5, "messages": [message]},
            ]
        }
    }
    records, rejected, _ = read(_export(tmp_path, full))
    assert [(r.where, r.reason) for r in rejected] == [
        (
            "result.json:chat lost",
            "chat has no id before its messages: its messages are not imported",
        )
    ]
    assert [r.portal for r in records if isinstance(r, NetworkMessage)] == ["5"]

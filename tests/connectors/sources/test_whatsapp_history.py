"""whatsapp-history: mautrix-whatsapp databases (SQLite and Postgres, both schemas)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from connectors.conformance import assert_streaming_memory, by_id, check_source, collect, messages
from connectors.source import SourceError
from connectors.sources.whatsapp_history import WhatsAppHistorySource
from tests.conftest import unique
from tests.wa_bridge import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    GROUP,
    OWN,
    T0,
    Bridge,
    msg,
    sample,
    web_message,
    write_postgres,
    write_sqlite,
)

KINDS = {"text", "notice", "location", "reaction", "edit", "redaction"}
OWN_JID = f"{OWN}@s.whatsapp.net"


def mid(chat: str, sender: str, key: str) -> str:
    return f"{chat}:{sender}:{key}"


def check_sample(records: list) -> None:
    """What the sample must give, whichever database holds it."""
    got = by_id(records)
    portals = {r.portal: r.name for r in records if type(r).__name__ == "PortalInfo"}
    assert portals == {ALICE: "Alice A.", GROUP: "Family", DAVE: "+15550000005"}
    # The conversation's last message time ranks it for max_initial_conversations.
    ranks = {r.portal: r.last_activity_ts for r in records if type(r).__name__ == "PortalInfo"}
    assert ranks == {ALICE: T0 * 1000, GROUP: (T0 + 10) * 1000, DAVE: (T0 + 5) * 1000}
    # Own messages: the own JID in the id, the own LID ghost (senders prefer the LID).
    hello = got[(mid(ALICE, OWN_JID, "A2"), 0)]
    assert hello.sender.id == "lid-999000" and hello.content.body == "hello Alice"
    reply = got[(mid(ALICE, OWN_JID, "A3"), 0)]
    assert reply.reply_to == mid(ALICE, ALICE, "A1")
    heart = got[(mid(ALICE, OWN_JID, "A3") + f":reaction:{ALICE}", 0)]
    assert (heart.content.kind, heart.content.key, heart.sender.id) == (
        "reaction",
        "❤️",
        "15550000002",
    )
    image = got[(mid(ALICE, ALICE, "A4"), 0)]  # inside an ephemeral wrapper
    assert image.content.kind == "notice" and image.content.body.startswith(
        "Image (image/jpeg, 2.3 MB, 1280×720)\nthe view\n"
    )
    edit = got[(mid(ALICE, OWN_JID, "A5"), 0)]
    assert (edit.content.kind, edit.content.target, edit.content.body) == (
        "edit",
        mid(ALICE, OWN_JID, "A2"),
        "hello Alice!",
    )
    revoke = got[(mid(ALICE, ALICE, "A6"), 0)]
    assert (revoke.content.kind, revoke.content.target) == ("redaction", mid(ALICE, ALICE, "A1"))
    # The group: participants as senders, names from the bridge's ghost, contacts, push names.
    created = got[(mid(GROUP, BOB, "G0"), 0)]
    assert (created.content.kind, created.content.body) == ("notice", "created the group Family")
    assert created.sender.name == "Bob (bridge)"
    assert got[(mid(GROUP, CAROL, "G2"), 0)].sender.name == "Carol"
    doc = got[(mid(GROUP, OWN_JID, "G3"), 0)].content.body
    assert doc.startswith("Document: plan.pdf (application/pdf, 50.8 KB)\nthe plan")
    voice = got[(mid(GROUP, CAROL, "G4"), 0)].content.body
    assert voice.startswith("Voice message (audio/ogg, 1:15)")
    party = got[(mid(GROUP, BOB, "G5"), 0)].content
    assert (party.kind, party.target, party.key) == ("reaction", mid(GROUP, CAROL, "G2"), "🎉")
    inline = got[(mid(GROUP, BOB, "G1") + f":reaction:{CAROL}", 0)]
    assert inline.content.target == mid(GROUP, BOB, "G1") and inline.sender.id == "15550000004"
    where = got[(mid(GROUP, BOB, "G6"), 0)].content
    assert (where.kind, where.lat, where.lon) == ("location", 52.52, 13.405)
    assert got[(mid(GROUP, BOB, "G7"), 0)].content.body == "added Carol"
    # The LID chat: the sender is the LID, own messages carry the own LID.
    assert got[(mid(DAVE, DAVE, "D1"), 0)].sender.id == "lid-111222333"
    assert (mid(DAVE, "999000@lid", "D2"), 0) in got
    assert all(m.portal != "status@broadcast" for m in messages(records))
    # Oldest first per chat.
    for portal in portals:
        ts = [
            m.ts
            for m in messages(records)
            if m.portal == portal and m.content.kind not in ("reaction",)
        ]
        assert ts == sorted(ts), portal


def test_sqlite_bridgev2_conforms(tmp_path: Path) -> None:
    db = write_sqlite(tmp_path / "whatsapp.db", sample())
    report = check_source(
        lambda: WhatsAppHistorySource(db), expected_kinds=KINDS, allow_rejected=False
    )
    check_sample(report.records)
    assert report.stats["schema_bridgev2"] == 1 and report.stats["chats_skipped"] == 1
    assert report.stats["media_as_notice"] == 3 and report.stats["edits"] == 1


def test_sqlite_legacy_schema(tmp_path: Path) -> None:
    db = write_sqlite(tmp_path / "legacy.db", sample(), schema="legacy")
    report = check_source(
        lambda: WhatsAppHistorySource(db), expected_kinds=KINDS, allow_rejected=False
    )
    check_sample(report.records)
    assert report.stats["schema_legacy"] == 1


@pytest.mark.parametrize("schema", ["bridgev2", "legacy"])
async def test_postgres_both_schemas(pg_admin: str, schema: str) -> None:
    from backflow.stack.postgres import create_database, drop_database

    name = unique("wa_bridge_")
    url = await create_database(pg_admin, name)
    try:
        write_postgres(url, sample(), schema=schema)
        report = check_source(
            lambda: WhatsAppHistorySource(url), expected_kinds=KINDS, allow_rejected=False
        )
        check_sample(report.records)
        assert report.stats[f"schema_{schema}"] == 1
    finally:
        await drop_database(pg_admin, name)


def test_bad_rows_are_one_rejection_each(tmp_path: Path) -> None:
    b = Bridge()
    b.add(ALICE, web_message(ALICE, "ok1", T0, text="fine"))
    good = b.messages[0][4]
    b.add_raw(ALICE, "trunc", good[: len(good) // 2])
    b.add_raw(ALICE, "garbage", b"\xff\xfe not protobuf at all \x00\x01")
    b.add(ALICE, web_message(ALICE, "zero", 0, text="no time"))
    b.add(ALICE, web_message(ALICE, "future", int(time.time()) + 30 * 86400, text="later"))
    b.add(GROUP, web_message(GROUP, "nobody", T0 + 1, text="who said this"))
    b.add(GROUP, web_message(GROUP, "badjid", T0 + 2, participant="not a jid", text="x"))
    b.add("nonsense", web_message("nonsense", "n1", T0 + 3, text="x"))
    bad_utf8 = bytearray(b.messages[0][4])
    at = bad_utf8.index(b"fine")
    bad_utf8[at : at + 4] = b"\xff\xfe\xfd\xfc"
    b.add_raw(ALICE, "utf8", bytes(bad_utf8), ts=T0 + 5)
    b.add(ALICE, web_message(ALICE, "ok2", T0 + 10, text="still flowing"))
    db = write_sqlite(tmp_path / "bad.db", b)
    source = WhatsAppHistorySource(db)
    records, rejected = collect(source)
    texts = [m.content.body for m in messages(records)]
    assert texts == ["fine", "still flowing"]
    # A conversation whose chat is not a JID: one rejection, its messages are not read.
    [conv] = [r for r in rejected if "conversation" in r.where]
    assert conv.where == "whatsapp_history_sync_conversation nonsense"
    assert "'nonsense' is not a WhatsApp JID" in conv.reason
    reasons = {r.where.rsplit("id=", 1)[1]: r.reason for r in rejected if r is not conv}
    assert set(reasons) == {"trunc", "garbage", "zero", "future", "nobody", "badjid", "utf8"}
    assert reasons["utf8"] == "field 'message.conversation': not valid UTF-8"
    assert "not a HistorySyncMsg" in reasons["garbage"]
    assert "timestamp 0" in reasons["zero"] and "in the future" in reasons["future"]
    assert "names no participant" in reasons["nobody"]
    assert "'not a jid' is not a WhatsApp JID" in reasons["badjid"]
    assert all(
        r.where.startswith("whatsapp_history_sync_message chat=") for r in rejected if r is not conv
    )


def test_neither_schema_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE messages (id TEXT)")
    conn.close()
    with pytest.raises(SourceError, match="expected the tables whatsapp_history_sync_conversation"):
        list(WhatsAppHistorySource(path).read())
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 100)
    with pytest.raises(SourceError, match="not a readable SQLite database"):
        list(WhatsAppHistorySource(junk).read())


def test_unknown_message_types_are_counted_not_fatal(tmp_path: Path) -> None:
    b = Bridge()
    info = web_message(ALICE, "U1", T0, text=None)
    raw = bytearray(info.SerializeToString())
    # Field 2 (message) holding only field 999 (varint 1): a type we do not know.
    unknown = bytes([0xB8, 0x3E, 0x01])
    raw += bytes([0x12, len(unknown)]) + unknown
    wrapper = bytes([0x0A, len(raw)]) + bytes(raw)
    b.add_raw(ALICE, "U1", wrapper)
    b.add(ALICE, web_message(ALICE, "U2", T0 + 1, text="after"))
    db = write_sqlite(tmp_path / "unknown.db", b)
    source = WhatsAppHistorySource(db)
    records, rejected = collect(source)
    assert rejected == []
    bodies = [m.content.body for m in messages(records)]
    assert bodies == ["Unsupported WhatsApp message (field 999)", "after"]
    assert source.stats["unknown_message_types"] == 1


def test_login_and_own_jid_options(tmp_path: Path) -> None:
    db = write_sqlite(tmp_path / "wa.db", sample())
    with pytest.raises(SourceError, match="no history sync rows for that login"):
        list(WhatsAppHistorySource(db, {"login": "123"}).read())
    records, _ = collect(WhatsAppHistorySource(db, {"login": OWN, "own_jid": BOB}))
    ids = {m.id for m in messages(records)}
    assert mid(ALICE, BOB, "A2") in ids


def test_thread_comment_and_media_caption_reply(tmp_path: Path) -> None:
    b = Bridge()
    b.add(GROUP, web_message(GROUP, "P1", T0, participant=BOB, text="post"))
    info = web_message(GROUP, "C1", T0 + 1, participant=CAROL, text="comment")
    info.comment_metadata.comment_parent_key.CopyFrom(
        msg("MessageKey", remote_jid=GROUP, id="P1", participant=BOB)
    )
    b.add(GROUP, info)
    quote = msg("ContextInfo", stanza_id="P1", participant=BOB)
    video = msg("VideoMessage", mimetype="video/mp4", seconds=3, caption="clip", context_info=quote)
    b.add(GROUP, web_message(GROUP, "V1", T0 + 2, participant=CAROL, video=video))
    records, rejected = collect(WhatsAppHistorySource(write_sqlite(tmp_path / "t.db", b)))
    got = by_id(records)
    assert rejected == []
    assert got[(mid(GROUP, CAROL, "C1"), 0)].thread == mid(GROUP, BOB, "P1")
    assert got[(mid(GROUP, CAROL, "V1"), 0)].reply_to == mid(GROUP, BOB, "P1")


def test_memory_is_flat(tmp_path: Path) -> None:
    def make(n: int) -> WhatsAppHistorySource:
        b = Bridge()
        for c in range(n // 500):
            chat = f"1555{c:07d}@s.whatsapp.net"
            for i in range(500):
                b.add(chat, web_message(chat, f"M{i}", T0 + i, text=f"message {i} " * 4))
        return WhatsAppHistorySource(write_sqlite(tmp_path / f"big{n}.db", b))

    assert_streaming_memory(make, 2_000, 20_000)


def test_passwords_never_show(pg_admin: str) -> None:
    from connectors.sources.wa_bridge_db import redact

    assert redact("postgresql://bridge:s3cret@db:5432/wa") == "postgresql://bridge:***@db:5432/wa"
    assert (
        redact("postgres://u:p%40ss@h/db?sslmode=require")
        == "postgres://u:***@h/db?sslmode=require"
    )
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    # A refused connection names the database without its password.
    url = "postgresql://nobody:hunter2@127.0.0.1:1/nothing"
    with pytest.raises(SourceError) as info:
        list(WhatsAppHistorySource(url).read())
    assert "hunter2" not in str(info.value) and "nobody:***@127.0.0.1:1" in str(info.value)

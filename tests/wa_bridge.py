"""Test helper: mautrix-whatsapp databases (SQLite file or Postgres) holding history sync rows.

Rows are encoded by our own schema (connectors.sources.wa_proto) the way the
bridge stores them: ``data`` = a serialized ``HistorySyncMsg``. ``sample()``
is a small account with DMs, a group, own messages, a LID chat, replies,
reactions, an edit, a revoke, media, stubs and wrappers.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.sources import wa_proto as pb

OWN = "15550000001"
ALICE = "15550000002@s.whatsapp.net"
BOB = "15550000003@s.whatsapp.net"
CAROL = "15550000004@s.whatsapp.net"
DAVE_PN, DAVE_LID = "15550000005", "111222333"
DAVE = f"{DAVE_LID}@lid"
GROUP = "120363000000000001@g.us"
T0 = 1_700_000_000  # seconds

BRIDGEV2_DDL = """
CREATE TABLE whatsapp_history_sync_conversation (
    bridge_id TEXT NOT NULL, user_login_id TEXT NOT NULL, chat_jid TEXT NOT NULL,
    last_message_timestamp BIGINT, archived BOOLEAN, pinned BOOLEAN, mute_end_time BIGINT,
    end_of_history_transfer_type INTEGER, ephemeral_expiration INTEGER,
    ephemeral_setting_timestamp BIGINT, marked_as_unread BOOLEAN, unread_count INTEGER,
    synced_login_ts BIGINT,
    PRIMARY KEY (bridge_id, user_login_id, chat_jid));
CREATE TABLE whatsapp_history_sync_message (
    bridge_id TEXT NOT NULL, user_login_id TEXT NOT NULL, chat_jid TEXT NOT NULL,
    sender_jid TEXT NOT NULL, message_id TEXT NOT NULL, timestamp BIGINT NOT NULL,
    data {blob} NOT NULL, inserted_time BIGINT NOT NULL,
    PRIMARY KEY (bridge_id, user_login_id, chat_jid, sender_jid, message_id));
CREATE TABLE ghost (bridge_id TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (bridge_id, id));
CREATE TABLE portal (bridge_id TEXT NOT NULL, id TEXT NOT NULL, receiver TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '', PRIMARY KEY (bridge_id, id, receiver));
"""
LEGACY_DDL = """
CREATE TABLE "user" (mxid TEXT PRIMARY KEY, username TEXT);
CREATE TABLE history_sync_conversation (
    user_mxid TEXT NOT NULL, conversation_id TEXT NOT NULL, portal_jid TEXT,
    portal_receiver TEXT, last_message_timestamp TIMESTAMP, archived BOOLEAN, pinned INTEGER,
    mute_end_time TIMESTAMP, disappearing_mode INTEGER, end_of_history_transfer_type INTEGER,
    ephemeral_expiration INTEGER, marked_as_unread BOOLEAN, unread_count INTEGER,
    PRIMARY KEY (user_mxid, conversation_id));
CREATE TABLE history_sync_message (
    user_mxid TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
    timestamp TIMESTAMP, data {blob}, inserted_time TIMESTAMP,
    PRIMARY KEY (user_mxid, conversation_id, message_id));
CREATE TABLE puppet (username TEXT PRIMARY KEY, displayname TEXT);
CREATE TABLE portal (jid TEXT, receiver TEXT, name TEXT, PRIMARY KEY (jid, receiver));
"""
WHATSMEOW_DDL = """
CREATE TABLE whatsmeow_contacts (our_jid TEXT, their_jid TEXT, first_name TEXT,
    full_name TEXT, push_name TEXT, business_name TEXT, PRIMARY KEY (our_jid, their_jid));
CREATE TABLE whatsmeow_lid_map (lid TEXT PRIMARY KEY, pn TEXT UNIQUE NOT NULL);
"""


def web_message(
    chat: str,
    msg_id: str,
    ts: int,
    *,
    from_me: bool = False,
    participant: str = "",
    push_name: str = "",
    text: str | None = None,
    **content: Any,
) -> Any:
    """A WebMessageInfo; ``content`` sets Message fields by our schema's names."""
    info = pb.WebMessageInfo()
    info.key.remote_jid, info.key.from_me, info.key.id = chat, from_me, msg_id
    if participant:
        info.participant = participant
    info.message_timestamp = ts
    if push_name:
        info.push_name = push_name
    if text is not None:
        info.message.conversation = text
    for name, value in content.items():
        if name == "stub":
            info.message_stub_type, params = value
            info.message_stub_parameters.extend(params)
        elif name == "reactions":
            for reactor_from_me, reactor, emoji in value:
                r = info.reactions.add()
                r.key.remote_jid, r.key.from_me, r.key.id = chat, reactor_from_me, msg_id + "r"
                if reactor:
                    r.key.participant = reactor
                r.text, r.sender_timestamp_ms = emoji, (ts + 5) * 1000
        else:
            getattr(info.message, name).CopyFrom(value)
    return info


def encode(info: Any) -> bytes:
    wrapper = pb.HistorySyncMsg()
    wrapper.message.CopyFrom(info)
    return wrapper.SerializeToString()


def msg(cls: str, **fields: Any) -> Any:
    """A sub-message of our schema by class name, fields set by keyword."""
    out = pb.CLASSES[cls]()
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(out, key).extend(value)
        elif hasattr(value, "SerializeToString"):
            getattr(out, key).CopyFrom(value)
        else:
            setattr(out, key, value)
    return out


@dataclass
class Bridge:
    """Rows of a bridge database, written to SQLite or Postgres by the functions below."""

    login: str = OWN
    bridge_id: str = "whatsapp"
    conversations: list[tuple[str, int]] = field(default_factory=list)  # (chat, last ts)
    messages: list[tuple[str, str, str, int, bytes, int]] = field(default_factory=list)
    contacts: list[tuple[str, str]] = field(default_factory=list)  # (jid, push name)
    lid_map: list[tuple[str, str]] = field(default_factory=list)  # (lid, pn)
    ghosts: list[tuple[str, str]] = field(default_factory=list)  # (ghost id, name)
    portals: list[tuple[str, str]] = field(default_factory=list)  # (chat, name)

    def add(self, chat: str, info: Any, sender: str = "", inserted: int = 0) -> None:
        if chat not in {c for c, _ in self.conversations}:
            self.conversations.append((chat, info.message_timestamp))
        data = encode(info) if not isinstance(info, bytes) else info
        ts = info.message_timestamp if not isinstance(info, bytes) else T0
        mid = info.key.id if not isinstance(info, bytes) else f"raw{len(self.messages)}"
        self.messages.append((chat, sender or chat, mid, ts, data, inserted or int(time.time())))

    def add_raw(self, chat: str, mid: str, data: bytes, ts: int = T0) -> None:
        if chat not in {c for c, _ in self.conversations}:
            self.conversations.append((chat, ts))
        self.messages.append((chat, chat, mid, ts, data, int(time.time())))


def sample() -> Bridge:
    b = Bridge()
    b.lid_map += [(DAVE_LID, DAVE_PN), ("999000", OWN)]
    b.contacts += [(ALICE, "Alice A."), (CAROL, "Carol")]
    b.ghosts += [("15550000003", "Bob (bridge)")]
    b.portals += [(GROUP, "Family")]
    t = T0
    b.add(ALICE, web_message(ALICE, "A1", t, text="hi me", push_name="Alice"))
    b.add(ALICE, web_message(ALICE, "A2", t + 60, from_me=True, text="hello Alice"))
    quote = msg("ContextInfo", stanza_id="A1", participant=ALICE)
    reply = msg("ExtendedTextMessage", text="replying", context_info=quote)
    b.add(
        ALICE,
        web_message(
            ALICE, "A3", t + 120, from_me=True, extended_text=reply, reactions=[(False, "", "❤️")]
        ),
    )
    image = msg(
        "ImageMessage",
        mimetype="image/jpeg",
        caption="the view",
        file_length=2_400_000,
        width=1280,
        height=720,
    )
    b.add(
        ALICE,
        web_message(
            ALICE,
            "A4",
            t + 180,
            ephemeral=msg("FutureProofMessage", message=msg("Message", image=image)),
        ),
    )
    edit = msg(
        "ProtocolMessage",
        key=msg("MessageKey", remote_jid=ALICE, from_me=True, id="A2"),
        type=14,
        edited_message=msg("Message", conversation="hello Alice!"),
    )
    b.add(ALICE, web_message(ALICE, "A5", t + 240, from_me=True, protocol=edit))
    revoke = msg("ProtocolMessage", key=msg("MessageKey", remote_jid=ALICE, id="A1"), type=0)
    b.add(ALICE, web_message(ALICE, "A6", t + 300, protocol=revoke))
    # The group: several participants, a stub, wrappers, a document, a voice note.
    b.add(GROUP, web_message(GROUP, "G0", t + 10, participant=BOB, stub=(20, ["Family"])))
    b.add(
        GROUP,
        web_message(
            GROUP,
            "G1",
            t + 20,
            participant=BOB,
            text="welcome",
            push_name="Bobby",
            reactions=[(True, "", "👍"), (False, CAROL, "😂")],
        ),
    )
    b.add(GROUP, web_message(GROUP, "G2", t + 30, participant=CAROL, text="thanks"))
    doc = msg(
        "DocumentMessage",
        mimetype="application/pdf",
        file_name="plan.pdf",
        file_length=52_000,
        caption="the plan",
    )
    b.add(
        GROUP,
        web_message(
            GROUP,
            "G3",
            t + 40,
            from_me=True,
            document_with_caption=msg("FutureProofMessage", message=msg("Message", document=doc)),
        ),
    )
    voice = msg("AudioMessage", mimetype="audio/ogg", seconds=75, ptt=True)
    b.add(
        GROUP,
        web_message(
            GROUP,
            "G4",
            t + 50,
            participant=CAROL,
            view_once=msg("FutureProofMessage", message=msg("Message", audio=voice)),
        ),
    )
    react = msg(
        "Reaction", key=msg("MessageKey", remote_jid=GROUP, id="G2", participant=CAROL), text="🎉"
    )
    b.add(GROUP, web_message(GROUP, "G5", t + 60, participant=BOB, reaction=react))
    where = msg("LocationMessage", degrees_latitude=52.52, degrees_longitude=13.405, name="Berlin")
    b.add(GROUP, web_message(GROUP, "G6", t + 70, participant=BOB, location=where))
    b.add(GROUP, web_message(GROUP, "G7", t + 80, participant=BOB, stub=(27, [CAROL])))
    # A LID chat: the sender is the LID; own messages there are written with the own LID.
    b.add(DAVE, web_message(DAVE, "D1", t + 5, text="hey from dave", push_name="Dave"))
    b.add(DAVE, web_message(DAVE, "D2", t + 15, from_me=True, text="hi dave"))
    # Never portals.
    b.add(
        "status@broadcast",
        web_message("status@broadcast", "S1", t, participant=ALICE, text="status"),
    )
    return b


# ---------------------------------------------------------------- writers


def _rows(b: Bridge, schema: str) -> list[tuple[str, list[tuple]]]:
    if schema == "bridgev2":
        return [
            (
                "INSERT INTO whatsapp_history_sync_conversation (bridge_id, user_login_id,"
                " chat_jid, last_message_timestamp) VALUES (?, ?, ?, ?)",
                [(b.bridge_id, b.login, c, ts) for c, ts in b.conversations],
            ),
            (
                "INSERT INTO whatsapp_history_sync_message VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(b.bridge_id, b.login, c, s, m, ts, d, ins) for c, s, m, ts, d, ins in b.messages],
            ),
            ("INSERT INTO ghost VALUES (?, ?, ?)", [(b.bridge_id, g, n) for g, n in b.ghosts]),
            (
                "INSERT INTO portal VALUES (?, ?, '', ?)",
                [(b.bridge_id, c, n) for c, n in b.portals],
            ),
            *_whatsmeow(b),
        ]
    mxid = "@me:example.org"
    return [
        ('INSERT INTO "user" VALUES (?, ?)', [(mxid, b.login)]),
        (
            "INSERT INTO history_sync_conversation (user_mxid, conversation_id, portal_jid,"
            " portal_receiver, last_message_timestamp) VALUES (?, ?, ?, ?, ?)",
            [(mxid, c, c, mxid, _iso(ts)) for c, ts in b.conversations],
        ),
        (
            "INSERT INTO history_sync_message VALUES (?, ?, ?, ?, ?, ?)",
            [(mxid, c, m, _iso(ts), d, _iso(ins)) for c, _s, m, ts, d, ins in b.messages],
        ),
        ("INSERT INTO puppet VALUES (?, ?)", [(g, n) for g, n in b.ghosts]),
        ("INSERT INTO portal VALUES (?, ?, ?)", [(c, "", n) for c, n in b.portals]),
        *_whatsmeow(b),
    ]


def _whatsmeow(b: Bridge) -> list[tuple[str, list[tuple]]]:
    own = f"{b.login}:3@s.whatsapp.net"
    return [
        (
            "INSERT INTO whatsmeow_contacts (our_jid, their_jid, push_name) VALUES (?, ?, ?)",
            [(own, j, n) for j, n in b.contacts],
        ),
        ("INSERT INTO whatsmeow_lid_map VALUES (?, ?)", b.lid_map),
    ]


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def write_sqlite(path: Path, b: Bridge, schema: str = "bridgev2") -> Path:
    ddl = (BRIDGEV2_DDL if schema == "bridgev2" else LEGACY_DDL).format(blob="BLOB")
    with sqlite3.connect(path) as conn:
        conn.executescript(ddl + WHATSMEOW_DDL)
        for sql, rows in _rows(b, schema):
            conn.executemany(sql, rows)
    conn.close()
    return path


def insert_sqlite(path: Path, b: Bridge) -> None:
    """Add ``b``'s conversations (if new) and messages to an existing bridgev2 file."""
    with sqlite3.connect(path) as conn:
        for sql, rows in _rows(b, "bridgev2")[:2]:
            conn.executemany(sql.replace("INSERT", "INSERT OR IGNORE"), rows)
    conn.close()


def _pg(sql: str) -> str:
    parts = sql.split("?")
    return parts[0] + "".join(f"%s{p}" for p in parts[1:])


def write_postgres(url: str, b: Bridge, schema: str = "bridgev2") -> None:
    import psycopg2

    ddl = (BRIDGEV2_DDL if schema == "bridgev2" else LEGACY_DDL).format(blob="bytea")
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(ddl + WHATSMEOW_DDL)
            for sql, rows in _rows(b, schema):
                rows = [
                    tuple(psycopg2.Binary(v) if isinstance(v, bytes) else v for v in r)
                    for r in rows
                ]
                cur.executemany(_pg(sql), rows)
    finally:
        conn.close()


def insert_postgres(url: str, b: Bridge) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            for sql, rows in _rows(b, "bridgev2")[:2]:
                rows = [
                    tuple(psycopg2.Binary(v) if isinstance(v, bytes) else v for v in r)
                    for r in rows
                ]
                cur.executemany(_pg(sql) + " ON CONFLICT DO NOTHING", rows)
    finally:
        conn.close()


def history_sync(
    conversations: list[tuple[str, list[Any], dict[str, Any]]],
    pushnames: list[tuple[str, str]] = (),
    lid_map: list[tuple[str, str]] = (),
    sync_type: int = 0,
) -> bytes:
    """A serialized HistorySync: (chat, WebMessageInfos oldest first, Conversation fields)."""
    blob = pb.HistorySync(sync_type=sync_type)
    for chat, infos, extra in conversations:
        conv = blob.conversations.add(id=chat, **extra)
        for info in reversed(infos):  # WhatsApp sends them newest first
            conv.messages.add().message.CopyFrom(info)
    for jid, name in pushnames:
        blob.pushnames.add(id=jid, pushname=name)
    for pn, lid in lid_map:
        blob.pn_lid_mappings.add(pn_jid=pn, lid_jid=lid)
    return blob.SerializeToString()

"""An encoder of Signal Android ``.backup`` files, written from the BRIEF (section 8).

Independent of the importer's reader: its own protobuf encoder, and the
frame layout spelled out here (header, then per frame a fresh AES-256-CTR
counter block and a 10-byte truncated HMAC-SHA256), so a test that reads
what this writes checks the reader against the format, not against itself.
Only the key derivation is shared (checked apart against its definition).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from connectors.sources.signal_crypto import legacy_keys
from tests.signal_helpers import ALICE_ACI, BOB_ACI, MASTER_KEY, PNG, SELF_ACI, T0

PASSPHRASE = "123451234512345123451234512345"
SHOWN_PASSPHRASE = "12345 12345 12345 12345 12345 12345"


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes | str | float) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    if isinstance(value, float):
        return varint(number << 3 | 1) + struct.pack("<d", value)
    return varint(number << 3) + varint(int(value))


def parameter(value: object) -> bytes:
    if value is None:
        return field(5, 1)
    if isinstance(value, bool | int):
        return field(2, int(value))
    if isinstance(value, float):
        return field(3, value)
    if isinstance(value, bytes):
        return field(4, value)
    return field(1, str(value))


class BackupWriter:
    """Writes frames as Signal's FullBackupExporter does (version 1, or 0)."""

    def __init__(self, out: IO[bytes], passphrase: str = PASSPHRASE, version: int = 1) -> None:
        self.out, self.version = out, version
        self.iv = b"\xff\xff\xff\xf0" + bytes(range(12))  # the counter wraps mid-file
        salt = hashlib.sha256(b"salt").digest()
        self.cipher_key, self.mac_key = legacy_keys(passphrase.replace(" ", "").encode(), salt)
        self.counter = int.from_bytes(self.iv[:4], "big")
        header = field(1, self.iv) + field(2, salt) + (field(3, version) if version else b"")
        frame = field(1, header)
        out.write(len(frame).to_bytes(4, "big") + frame)
        self.frames = 0
        self.corrupt_payloads = False  # flip a payload byte after its MAC was computed

    def _iv(self) -> bytes:
        iv = (self.counter & 0xFFFFFFFF).to_bytes(4, "big") + self.iv[4:]
        self.counter += 1
        return iv

    def frame(self, plaintext: bytes) -> None:
        encryptor = Cipher(algorithms.AES256(self.cipher_key), modes.CTR(self._iv())).encryptor()
        length = (len(plaintext) + 10).to_bytes(4, "big")
        mac = hmac.new(self.mac_key, digestmod=hashlib.sha256)
        if self.version >= 1:
            length = encryptor.update(length)
            mac.update(length)
        ciphertext = encryptor.update(plaintext) + encryptor.finalize()
        mac.update(ciphertext)
        self.out.write(length + ciphertext + mac.digest()[:10])
        self.frames += 1

    def payload(self, data: bytes) -> None:
        iv = self._iv()
        encryptor = Cipher(algorithms.AES256(self.cipher_key), modes.CTR(iv)).encryptor()
        ciphertext = encryptor.update(data) + encryptor.finalize()
        mac = hmac.new(self.mac_key, iv + ciphertext, "sha256").digest()[:10]
        if self.corrupt_payloads:
            ciphertext = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        self.out.write(ciphertext + mac)

    def statement(self, sql: str, *params: object) -> None:
        body = field(1, sql) + b"".join(field(2, parameter(p)) for p in params)
        self.frame(field(2, body))

    def insert(self, table: str, row: dict[str, object]) -> None:
        marks = ", ".join("?" for _ in row)
        self.statement(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})", *row.values())

    def attachment(self, row_id: int, data: bytes) -> None:
        self.frame(field(4, field(1, row_id) + field(2, row_id * 7) + field(3, len(data))))
        self.payload(data)

    def database_version(self, version: int) -> None:
        self.frame(field(5, field(1, version)))

    def key_value(self, key: str, text: str) -> None:
        self.frame(field(9, field(1, key) + field(7, text)))

    def end(self) -> None:
        self.frame(field(6, 1))


def group_id(master_key: bytes = MASTER_KEY) -> str:
    from connectors.sources.signal_ids import group_identifier

    return "__signal_group__v2__!" + group_identifier(master_key).hex()


NEW_SCHEMA = (
    "CREATE TABLE recipient (_id INTEGER PRIMARY KEY, aci TEXT, e164 TEXT, group_id TEXT, "
    "system_joined_name TEXT, profile_joined_name TEXT)",
    "CREATE TABLE thread (_id INTEGER PRIMARY KEY, recipient_id INTEGER)",
    "CREATE TABLE message (_id INTEGER PRIMARY KEY, thread_id INTEGER, date_sent INTEGER, "
    "type INTEGER, from_recipient_id INTEGER, body TEXT, quote_id INTEGER, quote_author INTEGER, "
    "message_ranges BLOB, remote_deleted INTEGER DEFAULT 0, original_message_id INTEGER, "
    "latest_revision_id INTEGER, expires_in INTEGER DEFAULT 0, view_once INTEGER DEFAULT 0)",
    "CREATE TABLE attachment (_id INTEGER PRIMARY KEY, message_id INTEGER, content_type TEXT, "
    "file_name TEXT, data_size INTEGER, width INTEGER, height INTEGER)",
    "CREATE TABLE reaction (_id INTEGER PRIMARY KEY, message_id INTEGER, author_id INTEGER, "
    "emoji TEXT, date_sent INTEGER)",
    "CREATE TABLE groups (_id INTEGER PRIMARY KEY, group_id TEXT, title TEXT)",
    "CREATE TABLE group_membership (_id INTEGER PRIMARY KEY, group_id TEXT, recipient_id INTEGER)",
    "CREATE INDEX message_thread ON message (thread_id)",
)
INCOMING, OUTGOING_SENT = 20 | 0x800000, 23 | 0x800000  # base type | a push flag


def bold_ranges() -> bytes:
    """BodyRangeList with BOLD (0) over 0..5 and SPOILER (2) over 6..9 (database numbering)."""
    return field(1, field(1, 0) + field(2, 5) + field(4, 0)) + field(
        1, field(1, 6) + field(2, 3) + field(4, 2)
    )


def write_new_layout(
    writer: BackupWriter,
    extra: int = 0,
    alice: str = ALICE_ACI,
    bob: str = BOB_ACI,
    master_key: bytes = MASTER_KEY,
) -> None:
    """A database of version 230 (``message`` table): DM with Alice and the group Hikers.

    Other ACIs and master key give the same chats as other portals.
    """
    writer.database_version(230)
    gid = group_id(master_key)
    for sql in NEW_SCHEMA:
        writer.statement(sql)
    for row in (
        {"_id": 1, "aci": SELF_ACI, "profile_joined_name": "Me"},
        {"_id": 2, "aci": alice, "e164": "+15550001", "profile_joined_name": "Alice"},
        {"_id": 3, "aci": bob, "system_joined_name": "Bob B"},
        {"_id": 4, "group_id": gid},
        {"_id": 5, "e164": "+15550009", "system_joined_name": "SMS only"},
    ):
        writer.insert("recipient", row)
    writer.insert("groups", {"_id": 1, "group_id": gid, "title": "Hikers"})
    for rid in (2, 3):
        writer.insert("group_membership", {"group_id": gid, "recipient_id": rid})
    for tid, rid in ((1, 2), (2, 4), (3, 5)):
        writer.insert("thread", {"_id": tid, "recipient_id": rid})
    rows = [
        (1, 1, T0 + 1_000, INCOMING, 2, "hello there", {}),
        (2, 1, T0 + 2_000, OUTGOING_SENT, 1, "hi Alice", {}),
        (3, 1, T0 + 3_000, INCOMING, 2, "replying", {"quote_id": T0 + 2_000, "quote_author": 1}),
        (4, 1, T0 + 4_000, INCOMING, 2, None, {}),
        (5, 1, T0 + 5_000, INCOMING, 2, "frist", {"latest_revision_id": 6}),
        (6, 1, T0 + 6_000, INCOMING, 2, "first (fixed)", {"original_message_id": 5}),
        (7, 2, T0 + 7_000, INCOMING, 3, "Hello you sss", {"message_ranges": bold_ranges()}),
        (8, 2, T0 + 8_000, INCOMING | 0x10000, 3, None, {}),
        (9, 2, T0 + 9_000, INCOMING, 3, "deleted", {"remote_deleted": 1}),
        (10, 2, T0 + 9_500, INCOMING, 3, "gone soon", {"expires_in": 60_000}),
        (11, 2, 0, INCOMING, 3, "no time", {}),
        (12, 3, T0 + 9_600, INCOMING, 5, "an SMS", {}),
        (13, 2, T0 + 10_000, INCOMING, 2, "last one", {}),
    ]
    rows += [
        (100 + i, 2, T0 + 20_000 + i, INCOMING, 3, f"message {i} " + "x" * (i % 40), {})
        for i in range(extra)
    ]
    for mid, tid, sent, kind, author, body, more in rows:
        row = {"_id": mid, "thread_id": tid, "date_sent": sent, "type": kind}
        writer.insert("message", {**row, "from_recipient_id": author, "body": body, **more})
        if mid == 3:
            reaction = {"message_id": 3, "author_id": 1, "emoji": "👍", "date_sent": T0 + 3_500}
            writer.insert("reaction", reaction)
        if mid == 4:
            image = {"_id": 1, "message_id": 4, "content_type": "image/png"}
            writer.insert("attachment", {**image, "file_name": "dot.png", "data_size": len(PNG)})
            writer.attachment(1, PNG)
            clip = {"_id": 2, "message_id": 4, "content_type": "video/mp4"}
            writer.insert("attachment", {**clip, "file_name": "clip.mp4", "data_size": 9})


OLD_SCHEMA = (
    "CREATE TABLE recipient (_id INTEGER PRIMARY KEY, uuid TEXT, phone TEXT, group_id TEXT, "
    "system_display_name TEXT, signal_profile_name TEXT)",
    "CREATE TABLE thread (_id INTEGER PRIMARY KEY, thread_recipient_id INTEGER)",
    "CREATE TABLE sms (_id INTEGER PRIMARY KEY, thread_id INTEGER, address INTEGER, "
    "date_sent INTEGER, type INTEGER, body TEXT, remote_deleted INTEGER, expires_in INTEGER)",
    "CREATE TABLE mms (_id INTEGER PRIMARY KEY, thread_id INTEGER, date INTEGER, "
    "msg_box INTEGER, address INTEGER, body TEXT, quote_id INTEGER, quote_author TEXT)",
    "CREATE TABLE part (_id INTEGER PRIMARY KEY, mid INTEGER, ct TEXT, file_name TEXT, "
    "data_size INTEGER, unique_id INTEGER)",
    "CREATE TABLE reaction (_id INTEGER PRIMARY KEY, message_id INTEGER, is_mms INTEGER, "
    "author_id INTEGER, emoji TEXT, date_sent INTEGER)",
    "CREATE TABLE groups (_id INTEGER PRIMARY KEY, group_id TEXT, title TEXT, members TEXT)",
)


def write_old_layout(writer: BackupWriter) -> None:
    """A database of version 100 (``sms`` + ``mms``, ``part``, ``address``)."""
    writer.database_version(100)
    for sql in OLD_SCHEMA:
        writer.statement(sql)
    writer.insert("recipient", {"_id": 1, "uuid": SELF_ACI})
    writer.insert("recipient", {"_id": 2, "uuid": ALICE_ACI, "signal_profile_name": "Alice"})
    writer.insert("recipient", {"_id": 3, "uuid": BOB_ACI, "system_display_name": "Bob B"})
    writer.insert("recipient", {"_id": 4, "group_id": group_id()})
    writer.insert("groups", {"_id": 1, "group_id": group_id(), "title": "Hikers", "members": "2,3"})
    writer.insert("thread", {"_id": 1, "thread_recipient_id": 2})
    writer.insert("thread", {"_id": 2, "thread_recipient_id": 4})
    sms = {"thread_id": 1, "address": 2}
    writer.insert("sms", {"_id": 1, **sms, "date_sent": T0 + 1_000, "type": 20, "body": "hello"})
    writer.insert("sms", {"_id": 2, **sms, "date_sent": T0 + 3_000, "type": 23, "body": "mine"})
    mms = {"_id": 1, "thread_id": 1, "date": T0 + 2_000, "msg_box": 20, "address": 2}
    writer.insert("mms", {**mms, "body": "a picture", "quote_id": T0 + 1_000, "quote_author": "2"})
    writer.insert("part", {"_id": 9, "mid": 1, "ct": "image/png", "file_name": "dot.png"})
    writer.attachment(9, PNG)
    writer.insert("reaction", {"message_id": 1, "is_mms": 1, "author_id": 3, "emoji": "❤️"})
    writer.insert("reaction", {"message_id": 1, "is_mms": 0, "author_id": 3, "emoji": "😮"})
    group = {"_id": 2, "thread_id": 2, "date": T0 + 4_000, "msg_box": 20, "address": 3}
    writer.insert("mms", {**group, "body": "group hello"})


def write_backup(
    path: Path, layout: str = "new", version: int = 1, passphrase: str = PASSPHRASE, **extra: Any
) -> Path:
    with path.open("wb") as out:
        writer = BackupWriter(out, passphrase, version)
        if layout == "new":
            write_new_layout(writer, **extra)
            writer.key_value("account.aci", SELF_ACI)
        else:
            write_old_layout(writer)
            # Before key-value frames the own ACI was a shared preference.
            own = field(1, "org.thoughtcrime.securesms_preferences") + field(2, "pref_local_uuid")
            writer.frame(field(3, own + field(3, SELF_ACI)))
        writer.frame(field(3, field(1, "prefs") + field(2, "key")))  # a preference
        writer.frame(field(42, b"from a future version"))  # an unknown frame type
        writer.end()
    return path

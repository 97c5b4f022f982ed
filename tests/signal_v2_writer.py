"""A writer of Signal backup v2 folders (``SignalBackups/``), from the BRIEF (section 8).

Frames are the plaintext export's dicts (``tests.signal_helpers``) encoded
with this file's own table of backup.proto field numbers (written from the
BRIEF, not the importer's), gzipped, AES-256-CBC encrypted and closed by an
HMAC-SHA256, beside a ``metadata`` file holding the encrypted backup id. The
key derivations are the importer's, checked apart against the published
vectors.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import hmac
import io
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from connectors.sources import signal_crypto as sc
from tests.signal_backup_writer import field, varint
from tests.signal_helpers import PNG, SELF_ACI, T0, sample_frames

RECOVERY_KEY = "dtjs858asj6tv0jzsqrsmj0ubp335pisj98e9ssnss8myoc08drhtcktyawvx45l"
SHOWN_RECOVERY_KEY = (
    "DTJS 858A SJ6T V0JZ SQRS MJ0U BP33 5PIS J98E 9SSN SS8M YOC0 8DRH TCKT YAWV X45L"
)
LOCAL_KEY = bytes(range(64))

# name -> (field number, kind): "u" integer, "s" string, "b" base64 bytes, "?" bool, or a table.
_LOCATOR = {"key": (1, "b"), "size": (3, "u"), "localKey": (9, "b"), "plaintextHash": (10, "b")}
_POINTER = {
    "contentType": (4, "s"),
    "fileName": (7, "s"),
    "width": (8, "u"),
    "height": (9, "u"),
    "caption": (10, "s"),
    "locatorInfo": (13, _LOCATOR),
}
_REACTION = {"emoji": (1, "s"), "authorId": (2, "u"), "sentTimestamp": (3, "u")}
_RANGE = {"start": (1, "u"), "length": (2, "u"), "mentionAci": (3, "b"), "style": (4, "u")}
_STANDARD = {
    "quote": (1, {"targetSentTimestamp": (1, "u"), "authorId": (2, "u")}),
    "text": (2, {"body": (1, "s"), "bodyRanges": (2, _RANGE)}),
    "attachments": (3, {"pointer": (1, _POINTER)}),
    "reactions": (6, _REACTION),
}
_ITEM: dict[str, Any] = {
    "chatId": (1, "u"),
    "authorId": (2, "u"),
    "dateSent": (3, "u"),
    "expiresInMs": (5, "u"),
    "incoming": (8, {"dateReceived": (1, "u"), "read": (3, "?")}),
    "outgoing": (9, {}),
    "standardMessage": (11, _STANDARD),
    "stickerMessage": (13, {"sticker": (1, {"emoji": (4, "s")}), "reactions": (2, _REACTION)}),
    "remoteDeletedMessage": (14, {}),
    "updateMessage": (15, {"simpleUpdate": (1, {"type": (1, "u")})}),
}
_ITEM["revisions"] = (6, _ITEM)
_FRAME = {
    "account": (1, {}),
    "recipient": (
        2,
        {
            "id": (1, "u"),
            "contact": (
                2,
                {
                    "aci": (1, "b"),
                    "profileGivenName": (11, "s"),
                    "systemGivenName": (18, "s"),
                    "systemFamilyName": (19, "s"),
                },
            ),
            "group": (
                3,
                {
                    "masterKey": (1, "b"),
                    "snapshot": (
                        5,
                        {
                            "title": (2, {"title": (1, "s")}),
                            "members": (7, {"userId": (1, "b")}),
                        },
                    ),
                },
            ),
            "self": (5, {}),
            "releaseNotes": (6, {}),
        },
    ),
    "chat": (3, {"id": (1, "u"), "recipientId": (2, "u")}),
    "chatItem": (4, _ITEM),
}
_STYLES = {"BOLD": 1, "ITALIC": 2, "SPOILER": 3, "STRIKETHROUGH": 4, "MONOSPACE": 5}


def encode(value: dict[str, Any], table: dict[str, Any]) -> bytes:
    out = b""
    for name, item in value.items():
        if name not in table:
            out += field(99, b"unknown to this table")  # what a newer Signal might add
            continue
        number, kind = table[name]
        for one in item if isinstance(item, list) else [item]:
            if isinstance(kind, dict):
                out += field(number, encode(one, kind))
            elif kind == "b":
                out += field(number, base64.b64decode(one))
            elif kind == "s":
                out += field(number, str(one))
            elif kind == "?":
                out += field(number, int(bool(one)))
            else:
                number_value = (
                    _STYLES.get(one, 2) if isinstance(one, str) and not one.isdigit() else int(one)
                )
                out += field(number, number_value)
    return out


def v2_frames() -> list[dict[str, Any]]:
    """The export's sample, with the image's 64-byte local key of a v2 backup."""
    frames = copy.deepcopy(sample_frames())
    for frame in frames:
        std = frame.get("chatItem", {}).get("standardMessage", {})
        for attachment in std.get("attachments", ()):
            locator = attachment["pointer"].get("locatorInfo")
            if locator:
                locator["localKey"] = base64.b64encode(LOCAL_KEY).decode()
    return frames


def _cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def write_v2(
    folder: Path,
    frames: Iterable[dict[str, Any]] | None = None,
    recovery_key: str = RECOVERY_KEY,
    aci: str = SELF_ACI,
) -> Path:
    """``SignalBackups/`` with one snapshot and the sample's image under ``files/``."""
    root = folder / "SignalBackups"
    snapshot = root / "signal-backup-2026-05-01-10-00-00"
    snapshot.mkdir(parents=True, exist_ok=True)
    key = sc.backup_key(sc.normalize_recovery_key(recovery_key))
    backup_id = sc.backup_id(key, uuid.UUID(aci).bytes)
    iv12 = b"\x07" * 12
    counter = Cipher(algorithms.AES256(sc.local_metadata_key(key)), modes.CTR(iv12 + bytes(4)))
    encrypted_id = counter.encryptor().update(backup_id)
    (snapshot / "metadata").write_bytes(
        field(1, 1) + field(2, field(1, iv12) + field(2, encrypted_id))
    )

    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb") as stream:  # frames one at a time
        info = field(1, 1) + field(2, T0 + 99_000)  # BackupInfo
        stream.write(varint(len(info)) + info)
        for frame in v2_frames() if frames is None else frames:
            message = encode(frame, _FRAME)
            stream.write(varint(len(message)) + message)
    compressed = packed.getvalue() + bytes(7)  # zero padding may follow the member
    hmac_key, aes_key = sc.message_backup_keys(key, backup_id)
    iv = b"\x09" * 16
    body = iv + _cbc(aes_key, iv, compressed)
    (snapshot / "main").write_bytes(body + hmac.new(hmac_key, body, hashlib.sha256).digest())

    name = hashlib.sha256(hashlib.sha256(PNG).digest() + LOCAL_KEY).hexdigest()
    (root / "files" / name[:2]).mkdir(parents=True, exist_ok=True)
    aiv = b"\x03" * 16
    blob = aiv + _cbc(LOCAL_KEY[:32], aiv, PNG)
    blob += hmac.new(LOCAL_KEY[32:], blob, hashlib.sha256).digest()
    (root / "files" / name[:2] / name).write_bytes(blob)
    return root

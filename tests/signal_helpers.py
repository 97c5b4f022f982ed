"""Writers of Signal inputs from synthetic data, for the Signal importer tests.

``write_export`` writes a plaintext export folder (protobuf JSON frames as
libsignal's JSON exporter writes them: uint64 as strings, bytes as base64).
The encrypted ``.backup`` writer lives in ``tests/signal_backup_writer.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from connectors.sources.signal_ids import group_identifier, group_portal

SELF_ACI = "11111111-1111-4111-8111-111111111111"
ALICE_ACI = "a11ce000-0000-4000-8000-00000000a11c"
BOB_ACI = "b0b00000-0000-4000-8000-000000000b0b"
MASTER_KEY = bytes(range(32))
GROUP_PORTAL = group_portal(group_identifier(MASTER_KEY))
T0 = 1_700_000_000_000
# A 1x1 PNG: small, and a real image for the homeserver.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def aci_b64(aci: str) -> str:
    return b64(uuid.UUID(aci).bytes)


def _incoming(chat: int, author: int, sent: int, **item: Any) -> dict[str, Any]:
    return {
        "chatItem": {
            "chatId": str(chat),
            "authorId": str(author),
            "dateSent": str(sent),
            "incoming": {"dateReceived": str(sent + 5), "read": True},
            **item,
        }
    }


def _outgoing(chat: int, sent: int, **item: Any) -> dict[str, Any]:
    return {
        "chatItem": {
            "chatId": str(chat),
            "authorId": "1",
            "dateSent": str(sent),
            "outgoing": {},
            **item,
        }
    }


def _text(body: str, ranges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    text: dict[str, Any] = {"body": body}
    if ranges:
        text["bodyRanges"] = ranges
    return {"standardMessage": {"text": text}}


def recipients_and_chats() -> list[dict[str, Any]]:
    return [
        {"account": {"profileKey": b64(b"k" * 32), "username": "me.01"}},
        {"recipient": {"id": "1", "self": {}}},
        {
            "recipient": {
                "id": "2",
                "contact": {"aci": aci_b64(ALICE_ACI), "profileGivenName": "Alice"},
            }
        },
        {
            "recipient": {
                "id": "3",
                "contact": {
                    "aci": aci_b64(BOB_ACI),
                    "systemGivenName": "Bob",
                    "systemFamilyName": "B",
                },
            }
        },
        {
            "recipient": {
                "id": "4",
                "group": {
                    "masterKey": b64(MASTER_KEY),
                    "snapshot": {
                        "title": {"title": "Hikers"},
                        "members": [{"userId": aci_b64(ALICE_ACI)}, {"userId": aci_b64(BOB_ACI)}],
                    },
                },
            }
        },
        {"recipient": {"id": "5", "releaseNotes": {}}},
        {"chat": {"id": "10", "recipientId": "2"}},
        {"chat": {"id": "11", "recipientId": "4"}},
        {"chat": {"id": "12", "recipientId": "5"}},
    ]


def sample_frames() -> list[dict[str, Any]]:
    """Every case the importer maps, in a DM with Alice and the group Hikers."""
    image = {
        "pointer": {
            "contentType": "image/png",
            "fileName": "dot.png",
            "width": 1,
            "height": 1,
            "locatorInfo": {
                "plaintextHash": b64(hashlib.sha256(PNG).digest()),
                "localKey": b64(b"L" * 32),
                "size": len(PNG),
            },
        }
    }
    missing = {"pointer": {"contentType": "video/mp4", "fileName": "clip.mp4"}}
    bold = [
        {"start": 0, "length": 5, "style": "BOLD"},
        {"start": 6, "length": 1, "mentionAci": aci_b64(BOB_ACI)},
        {"start": 8, "length": 3, "style": 3},
    ]
    return [
        *recipients_and_chats(),
        _incoming(10, 2, T0 + 1_000, **_text("hello there")),
        _outgoing(10, T0 + 2_000, **_text("hi Alice")),
        _incoming(
            10,
            2,
            T0 + 3_000,
            standardMessage={
                "text": {"body": "replying"},
                "quote": {"targetSentTimestamp": str(T0 + 2_000), "authorId": "1"},
                "reactions": [{"emoji": "👍", "authorId": "1", "sentTimestamp": str(T0 + 3_500)}],
            },
        ),
        _incoming(10, 2, T0 + 4_000, standardMessage={"attachments": [image, missing]}),
        _incoming(
            10,
            2,
            T0 + 6_000,
            revisions=[
                {"dateSent": str(T0 + 5_000), **_text("frist")},
            ],
            **_text("first (fixed)"),
        ),
        _incoming(11, 3, T0 + 7_000, **_text("Hello \ufffc and sss", bold)),
        _incoming(11, 2, T0 + 8_000, stickerMessage={"sticker": {"emoji": "🐱"}}),
        _incoming(11, 3, T0 + 9_000, updateMessage={"simpleUpdate": {"type": "JOINED_SIGNAL"}}),
        _incoming(11, 3, T0 + 9_500, remoteDeletedMessage={}),
        _incoming(11, 3, T0 + 9_600, expiresInMs="60000", **_text("gone soon")),
        _incoming(11, 3, 0, **_text("no time")),
        _incoming(12, 5, T0 + 9_700, **_text("release notes")),
        {"someFutureFrame": {"x": 1}},
        _incoming(11, 2, T0 + 10_000, **_text("last one")),
    ]


def write_export(
    folder: Path, frames: list[dict[str, Any]] | None = None, extra_lines: tuple[str, ...] = ()
) -> Path:
    """A ``signal-export-…`` folder with ``main.jsonl`` and the sample's image in ``files/``."""
    root = folder / "signal-export-2026-05-01-10-00-00"
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.json").write_text(json.dumps({"version": 1}))
    name = hashlib.sha256(hashlib.sha256(PNG).digest() + b"L" * 32).hexdigest()
    (root / "files" / name[:2]).mkdir(parents=True, exist_ok=True)
    (root / "files" / name[:2] / f"{name}.png").write_bytes(PNG)
    with (root / "main.jsonl").open("w", encoding="utf-8") as out:
        out.write(json.dumps({"version": "1", "backupTimeMs": str(T0 + 99_000)}) + "\n")
        for frame in sample_frames() if frames is None else frames:
            out.write(json.dumps(frame, ensure_ascii=False) + "\n")
        for line in extra_lines:
            out.write(line + "\n")
    return root

"""libsignal's backup.proto Frames, decoded to the dicts the plaintext export holds.

Backup v2 files carry the same Frames as the plaintext export, as binary
protobuf. This decodes the fields the mapper reads into the protobuf JSON
mapping's shape (lowerCamelCase names, bytes as base64, enums as numbers),
so :class:`~connectors.sources.signal_frames.FrameMapper` serves both.
Field numbers: BRIEF section 8 (signalapp/libsignal:rust/message-backup/src/proto/backup.proto).
Fields not listed are skipped; a message listed as ``{}`` only marks presence.
"""

from __future__ import annotations

import base64
from typing import Any

from connectors.sources import protowire as pw

# A field: (name, kind, repeated); kind is "int", "str", "bytes", "bool" or a schema.
Schema = dict[int, tuple[str, Any, bool]]

EMPTY: Schema = {}
LOCATOR: Schema = {
    1: ("key", "bytes", False),
    3: ("size", "int", False),
    9: ("localKey", "bytes", False),
    10: ("plaintextHash", "bytes", False),
}
POINTER: Schema = {
    4: ("contentType", "str", False),
    7: ("fileName", "str", False),
    8: ("width", "int", False),
    9: ("height", "int", False),
    10: ("caption", "str", False),
    13: ("locatorInfo", LOCATOR, False),
}
REACTION: Schema = {
    1: ("emoji", "str", False),
    2: ("authorId", "int", False),
    3: ("sentTimestamp", "int", False),
    4: ("sortOrder", "int", False),
}
BODY_RANGE: Schema = {
    1: ("start", "int", False),
    2: ("length", "int", False),
    3: ("mentionAci", "bytes", False),
    4: ("style", "int", False),
}
TEXT: Schema = {1: ("body", "str", False), 2: ("bodyRanges", BODY_RANGE, True)}
STANDARD: Schema = {
    1: ("quote", {1: ("targetSentTimestamp", "int", False), 2: ("authorId", "int", False)}, False),
    2: ("text", TEXT, False),
    3: ("attachments", {1: ("pointer", POINTER, False), 2: ("flag", "int", False)}, True),
    6: ("reactions", REACTION, True),
}
STICKER: Schema = {
    1: ("sticker", {4: ("emoji", "str", False), 5: ("data", POINTER, False)}, False),
    2: ("reactions", REACTION, True),
}
UPDATE: Schema = {
    1: ("simpleUpdate", {1: ("type", "int", False)}, False),
    2: ("groupChange", EMPTY, False),
    3: ("expirationTimerChange", {1: ("expiresInMs", "int", False)}, False),
    4: ("profileChange", {1: ("previousName", "str", False), 2: ("newName", "str", False)}, False),
    6: ("individualCall", EMPTY, False),
    7: ("groupCall", EMPTY, False),
}
ITEM_FIELDS: Schema = {
    1: ("chatId", "int", False),
    2: ("authorId", "int", False),
    3: ("dateSent", "int", False),
    5: ("expiresInMs", "int", False),
    8: ("incoming", EMPTY, False),
    9: ("outgoing", EMPTY, False),
    10: ("directionless", EMPTY, False),
    11: ("standardMessage", STANDARD, False),
    12: ("contactMessage", EMPTY, False),
    13: ("stickerMessage", STICKER, False),
    14: ("remoteDeletedMessage", EMPTY, False),
    15: ("updateMessage", UPDATE, False),
    18: ("viewOnceMessage", EMPTY, False),
    19: ("directStoryReplyMessage", EMPTY, False),
    20: ("poll", EMPTY, False),
    22: ("adminDeletedMessage", EMPTY, False),
}
ITEM_FIELDS[6] = ("revisions", ITEM_FIELDS, True)  # earlier versions: ChatItems themselves
CONTACT: Schema = {
    1: ("aci", "bytes", False),
    4: ("e164", "int", False),
    11: ("profileGivenName", "str", False),
    12: ("profileFamilyName", "str", False),
    16: ("nickname", {1: ("given", "str", False), 2: ("family", "str", False)}, False),
    18: ("systemGivenName", "str", False),
    19: ("systemFamilyName", "str", False),
}
SNAPSHOT: Schema = {
    2: ("title", {1: ("title", "str", False)}, False),
    7: ("members", {1: ("userId", "bytes", False)}, True),
}
RECIPIENT: Schema = {
    1: ("id", "int", False),
    2: ("contact", CONTACT, False),
    3: ("group", {1: ("masterKey", "bytes", False), 5: ("snapshot", SNAPSHOT, False)}, False),
    4: ("distributionList", EMPTY, False),
    5: ("self", EMPTY, False),
    6: ("releaseNotes", EMPTY, False),
    7: ("callLink", EMPTY, False),
}
CHAT: Schema = {1: ("id", "int", False), 2: ("recipientId", "int", False)}
FRAME: Schema = {
    1: ("account", EMPTY, False),
    2: ("recipient", RECIPIENT, False),
    3: ("chat", CHAT, False),
    4: ("chatItem", ITEM_FIELDS, False),
    5: ("stickerPack", EMPTY, False),
    6: ("adHocCall", EMPTY, False),
    7: ("notificationProfile", EMPTY, False),
    8: ("chatFolder", EMPTY, False),
}
BACKUP_INFO: Schema = {1: ("version", "int", False), 2: ("backupTimeMs", "int", False)}
MAX_NESTING = 16  # revisions of revisions: no real backup comes near


def decode(data: bytes, schema: Schema, depth: int = 0) -> dict[str, Any]:
    """The listed fields of ``data``; WireError when it is not protobuf or nests too deep."""
    if depth > MAX_NESTING:
        raise pw.WireError(f"messages nested deeper than {MAX_NESTING} levels")
    out: dict[str, Any] = {}
    for number, wire, value in pw.fields(data):
        spec = schema.get(number)
        if spec is None:
            continue
        name, kind, repeated = spec
        if isinstance(kind, dict):
            if wire != pw.LEN:
                raise pw.WireError(f"field {name}: expected a message")
            item: Any = decode(value, kind, depth + 1)  # type: ignore[arg-type]
        elif kind in ("str", "bytes"):
            if wire != pw.LEN:
                raise pw.WireError(f"field {name}: expected bytes")
            item = (
                value.decode("utf-8", errors="replace")  # type: ignore[union-attr]
                if kind == "str"
                else base64.b64encode(value).decode("ascii")  # type: ignore[arg-type]
            )
        else:
            if wire == pw.LEN:
                raise pw.WireError(f"field {name}: expected a number")
            item = bool(value) if kind == "bool" else value
        if repeated:
            out.setdefault(name, []).append(item)
        else:
            out[name] = item
    return out

"""What a valid record is: the limits, and the validating parser behind the codec.

Every field is checked on the way in: type, length, range, and the fields a
content kind may carry. A defect raises ``RecordError`` naming the field by
its dotted path and the reason, which is what importers print and what dead
letters carry. Only ``topics.codec`` calls ``parse``; everyone else decodes
through the codec.
"""

from __future__ import annotations

import re
from typing import Any

from topics.records import (
    MAX_TS,
    MEDIA_TYPES,
    MIN_TS,
    RECORD_TYPES,
    Content,
    CreateRoom,
    DeadLetter,
    HistoryComplete,
    Member,
    NetworkMessage,
    PortalInfo,
    Record,
    RoomCreated,
    Sender,
    SendMessage,
    SyncComplete,
    portal_key,
)

# Kafka's default message.max.bytes is ~1 MB; stay under it with headroom.
MAX_RECORD_BYTES = 900_000
MAX_ID_LEN = 255
MAX_TEXT_LEN = 65_536

MAX_URL_LEN = 4096
# Parts are stored as Postgres integer (pipeline and sink); one beyond was
# refused by the database, far from the line.
MAX_PART = 2**31 - 1
NUL_IN_ID = "contains U+0000, which an identifier may not (Postgres text cannot store it)"
NUL_IN_NAME = "contains U+0000, which a name may not (Postgres text cannot store it)"

# Names of rebuilds (CreateRoom.rebuild): they end up in a room alias.
REBUILD_RE = re.compile(r"^[a-z0-9]{1,32}$")
NETWORK_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# Schemes the sink knows; anything else (file://, gopher://, a bare path) is
# refused where the line number is still known, not later by the sink.
URL_RE = re.compile(r"^(?:[hH][tT][tT][pP][sS]?|[mM][xX][cC])://[^\s\x00-\x1f\x7f]+$")


class RecordError(ValueError):
    """A record that does not match its schema."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field '{field}': {reason}" if field else reason)
        self.field = field
        self.reason = reason


def usable_key(network: Any, portal: Any) -> str | None:
    """The portal key of a (possibly invalid) record's network and portal, if both are valid.

    Lets a dead letter carry the key of the portal a rejected record was for.
    """
    if isinstance(network, str) and NETWORK_RE.match(network) and isinstance(portal, str):
        if 0 < len(portal) <= MAX_ID_LEN:
            return portal_key(network, portal)
    return None


def parse(obj: Any) -> Record:
    """Validate a decoded JSON value as a record (the generic, field-by-field path)."""
    if not isinstance(obj, dict):
        raise RecordError("", f"expected a JSON object, got {_typename(obj)}")
    kind = obj.get("type")
    if kind not in RECORD_TYPES:
        known = ", ".join(sorted(RECORD_TYPES))
        raise RecordError("type", f"unknown record type {kind!r} (known: {known})")
    return _PARSERS[kind](_Obj(obj, ""))


def _typename(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


class _Obj:
    """A JSON object being validated, remembering its path for error messages."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = data
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            raise RecordError(self._name(key), "missing")
        return value

    def str(self, key: str, required: bool = False, max_len: int = MAX_TEXT_LEN) -> Any:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise RecordError(self._name(key), f"expected a string, got {_typename(value)}")
        if required and not value:
            raise RecordError(self._name(key), "must not be empty")
        if len(value) > max_len:
            raise RecordError(self._name(key), f"longer than {max_len} characters")
        return value

    def id(self, key: str, required: bool = True) -> Any:
        value = self.str(key, required, MAX_ID_LEN)
        if value is not None and "\x00" in value:
            # Ids are keys in Postgres text columns, which cannot hold U+0000:
            # refused here, where an importer still knows the line.
            raise RecordError(self._name(key), NUL_IN_ID)
        return value

    def label(self, key: str) -> Any:
        """A display name (a sender's, a member's, a room's): at most 255, no U+0000."""
        value = self.str(key, max_len=255)
        if value is not None and "\x00" in value:
            # The sink keeps names in Postgres text (ghost profiles): a NUL
            # there was a dead letter at the sink, far from the line.
            raise RecordError(self._name(key), NUL_IN_NAME)
        return value

    def url(self, key: str) -> Any:
        """A URL the sink may fetch or use: http(s), or mxc for media already on Matrix."""
        value = self.str(key, max_len=MAX_URL_LEN)
        if value is not None and not URL_RE.match(value):
            raise RecordError(
                self._name(key),
                f"must be an http(s):// or mxc:// URL without spaces, got {value[:40]!r}",
            )
        return value

    def int(self, key: str, required: bool = False, minimum: int | None = None) -> Any:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(self._name(key), f"expected an integer, got {_typename(value)}")
        if minimum is not None and value < minimum:
            raise RecordError(self._name(key), f"must be >= {minimum}, got {value}")
        return value

    def part(self) -> int:
        value = self.int("part", minimum=0) or 0
        if value > MAX_PART:
            raise RecordError(self._name("part"), f"must be at most {MAX_PART}, got {value}")
        return value

    def float(self, key: str, required: bool = False) -> Any:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecordError(self._name(key), f"expected a number, got {_typename(value)}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise RecordError(self._name(key), f"expected true or false, got {_typename(value)}")
        return value

    def ts(self, key: str, required: bool = True) -> Any:
        value = self.int(key, required)
        if value is not None and not MIN_TS <= value < MAX_TS:
            raise RecordError(
                self._name(key),
                f"timestamp {value} is not Unix milliseconds between 2000 and 2100",
            )
        return value

    def obj(self, key: str, required: bool = True) -> _Obj | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise RecordError(self._name(key), f"expected an object, got {_typename(value)}")
        return _Obj(value, self._name(key))

    def objs(self, key: str) -> list[_Obj]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise RecordError(self._name(key), f"expected an array, got {_typename(value)}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise RecordError(
                    f"{self._name(key)}[{i}]", f"expected an object, got {_typename(item)}"
                )
            out.append(_Obj(item, f"{self._name(key)}[{i}]"))
        return out

    def network(self) -> str:
        value = self.id("network")
        if not NETWORK_RE.match(value):
            raise RecordError(
                self._name("network"),
                f"{value!r} must be lowercase letters, digits, '_', '.' or '-'",
            )
        return value


def _sender(o: _Obj) -> Sender:
    return Sender(id=o.id("id"), name=o.label("name"), avatar_url=o.url("avatar_url"))


def _member(o: _Obj) -> Member:
    return Member(id=o.id("id"), name=o.label("name"), avatar_url=o.url("avatar_url"))


def _content(o: _Obj) -> Content:
    kind = o.str("kind", required=True)
    if kind not in Content.KINDS:
        raise RecordError(
            o._name("kind"), f"unknown kind {kind!r} (known: {', '.join(Content.KINDS)})"
        )
    c: dict[str, Any] = {"kind": kind}
    if kind in ("text", "notice", "emote"):
        c["body"] = o.str("body", required=True)
        c["html"] = o.str("html")
    elif kind == "media":
        media_type = o.str("media_type", required=True)
        if media_type not in MEDIA_TYPES:
            raise RecordError(
                o._name("media_type"),
                f"must be one of {', '.join(MEDIA_TYPES)}, got {media_type!r}",
            )
        c.update(
            media_type=media_type,
            body=o.str("body"),
            filename=o.str("filename", max_len=255),
            mimetype=o.str("mimetype", max_len=255),
            size=o.int("size", minimum=0),
            url=o.url("url"),
            data=o.str("data", max_len=MAX_RECORD_BYTES),
            width=o.int("width", minimum=0),
            height=o.int("height", minimum=0),
            duration_ms=o.int("duration_ms", minimum=0),
        )
        if c["url"] is None and c["data"] is None:
            raise RecordError(o._name("url"), "media needs either 'url' or 'data' (base64)")
    elif kind == "location":
        lat, lon = o.float("lat", required=True), o.float("lon", required=True)
        if not -90 <= lat <= 90:
            raise RecordError(o._name("lat"), f"latitude {lat} out of range")
        if not -180 <= lon <= 180:
            raise RecordError(o._name("lon"), f"longitude {lon} out of range")
        c.update(lat=lat, lon=lon, body=o.str("body"))
    elif kind == "reaction":
        c.update(target=o.id("target"), key=o.str("key", required=True, max_len=255))
    elif kind == "edit":
        c.update(target=o.id("target"), body=o.str("body", required=True), html=o.str("html"))
    elif kind == "redaction":
        c.update(target=o.id("target"), reason=o.str("reason", max_len=1024))
    return Content(**c)


def _message(o: _Obj) -> NetworkMessage:
    sender = o.obj("sender")
    content = o.obj("content")
    assert sender is not None and content is not None
    return NetworkMessage(
        network=o.network(),
        portal=o.id("portal"),
        id=o.id("id"),
        sender=_sender(sender),
        ts=o.ts("ts"),
        content=_content(content),
        history=o.bool("history", True),
        part=o.part(),
        reply_to=o.id("reply_to", required=False),
        thread=o.id("thread", required=False),
    )

def _portal_meta(o: _Obj) -> dict[str, Any]:
    return {
        "network": o.network(),
        "portal": o.id("portal"),
        "name": o.label("name"),
        "topic": o.str("topic", max_len=4096),
        "members": tuple(_member(m) for m in o.objs("members")),
        "avatar_url": o.url("avatar_url"),
    }


def _portal(o: _Obj) -> PortalInfo:
    return PortalInfo(**_portal_meta(o), last_activity_ts=o.ts("last_activity_ts", required=False))


def _history_complete(o: _Obj) -> HistoryComplete:
    return HistoryComplete(
        network=o.network(),
        portal=o.id("portal"),
        count=o.int("count", minimum=0) or 0,
        sync=o.id("sync", required=False),
    )


def _sync_complete(o: _Obj) -> SyncComplete:
    return SyncComplete(
        network=o.network(), sync=o.id("sync"), portals=o.int("portals", True, minimum=0)
    )


def _room_created(o: _Obj) -> RoomCreated:
    return RoomCreated(
        network=o.network(),
        portal=o.id("portal"),
        room_id=o.id("room_id"),
        alias=o.str("alias", max_len=255),
        last_bridged_ts=o.ts("last_bridged_ts", required=False),
    )


def _create_room(o: _Obj) -> CreateRoom:
    names = {}
    for field_name in ("rebuild", "finish_rebuild"):
        value = o.id(field_name, required=False)
        if value is not None and not REBUILD_RE.match(value):
            raise RecordError(o._name(field_name), "a rebuild name is 1-32 of a-z and 0-9")
        names[field_name] = value
    return CreateRoom(**_portal_meta(o), **names)


def _send(o: _Obj) -> SendMessage:
    message = o.obj("message")
    assert message is not None
    if message.data.get("type", "message") != "message":
        raise RecordError("message.type", "a send command carries a message record")
    return SendMessage(message=_message(message), seq=o.int("seq", minimum=0) or 0)


def _dead_letter(o: _Obj) -> DeadLetter:
    return DeadLetter(
        stage=o.str("stage", required=True, max_len=255),
        reason=o.str("reason", required=True),
        original=o.str("original", max_len=MAX_RECORD_BYTES) or "",
        source=o.str("source", max_len=4096),
        key=o.str("key", max_len=4096),
        ts=o.int("ts", minimum=0) or 0,
    )


_PARSERS = {
    NetworkMessage.TYPE: _message,
    PortalInfo.TYPE: _portal,
    HistoryComplete.TYPE: _history_complete,
    SyncComplete.TYPE: _sync_complete,
    RoomCreated.TYPE: _room_created,
    CreateRoom.TYPE: _create_room,
    SendMessage.TYPE: _send,
    DeadLetter.TYPE: _dead_letter,
}

"""The one record codec: orjson on the wire, explicit validation on the way in.

The schema's rules live in ``topics.schema``; this module is the only way in
and out (``encode`` / ``decode``), with a fast path for the common message.

``decode`` never returns a half-valid record: anything wrong raises
``RecordError`` naming the field (dotted path) and the reason, which is what
importers print and what dead-letter records carry.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson

from topics.records import (
    MAX_TS,
    MIN_TS,
    Content,
    CreateRoom,
    NetworkMessage,
    PortalInfo,
    Record,
    Sender,
    SendMessage,
)
from topics.schema import (
    MAX_ID_LEN,
    MAX_PART,
    MAX_RECORD_BYTES,
    MAX_TEXT_LEN,
    MAX_URL_LEN,
    NETWORK_RE,
    URL_RE,
    RecordError,
    parse,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "RecordError",
    "create_room_command",
    "decode",
    "encode",
    "from_dict",
    "send_command",
    "stored_message",
    "to_dict",
]

# ---------------------------------------------------------------- encoding


# Field names per record class: dataclasses.fields() is slow on the hot path
# (every published and every sent record goes through here).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _plain(value: Any) -> Any:
    """JSON-ready ``value``: nested dataclasses as dicts, None-valued keys left out."""
    if hasattr(value, "__dataclass_fields__"):
        if hasattr(value, "TYPE"):
            return to_dict(value)
        return {
            n: _plain(v) for n in _names(type(value)) if (v := getattr(value, n)) is not None
        }
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(record: Record) -> dict[str, Any]:
    """The JSON-ready dict of a record, ``type`` first, unset fields left out."""
    out: dict[str, Any] = {"type": record.TYPE}
    for name in _names(type(record)):
        value = getattr(record, name)
        if value is not None:
            out[name] = _plain(value)
    return out


def encode(record: Record) -> bytes:
    return orjson.dumps(to_dict(record))


# ---------------------------------------------------------------- commands
# The pipeline stores a held message as bytes and later sends it inside a
# SendMessage; these keep those bytes the codec's, without a decode/encode.


def stored_message(record: Record, raw: bytes) -> bytes:
    """The bytes a held message is stored (and later sent) as: the record as published.

    ``raw`` passed this codec's validation on the way in, and every reader
    decodes it with the same codec, so re-encoding it would only cost time
    (~2 us a message). A record too close to the size limit to fit in a
    SendMessage is re-encoded instead, which drops anything the codec does not know.
    """
    if raw and len(raw) <= MAX_RECORD_BYTES - 100:
        return raw
    return encode(record)


def send_command(message: bytes, seq: int) -> bytes:
    """The encoded SendMessage around stored message bytes: identical to ``encode``.

    Built by concatenation so the outbox flush never decodes and re-encodes a body.
    """
    return b'{"type":"send","message":' + message + b',"seq":' + str(seq).encode() + b"}"


def create_room_command(network: str, portal: str, info: bytes | None) -> bytes:
    """The encoded CreateRoom for a portal, from its stored PortalInfo bytes if any."""
    known = decode(info) if info is not None else None
    if isinstance(known, PortalInfo):
        return encode(
            CreateRoom(
                network=network,
                portal=portal,
                name=known.name,
                topic=known.topic,
                members=known.members,
                avatar_url=known.avatar_url,
            )
        )
    return encode(CreateRoom(network=network, portal=portal))


# ---------------------------------------------------------------- decoding


def decode(data: bytes | str) -> Record:
    """Parse and validate one record; raise RecordError on any defect."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError("", f"record is {len(data)} bytes, over the {MAX_RECORD_BYTES} limit")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RecordError("", f"invalid JSON: {exc}") from None
    return from_dict(obj)


def from_dict(obj: Any) -> Record:
    """Validate a decoded JSON value as a record; raise RecordError on any defect."""
    if isinstance(obj, dict):
        kind = obj.get("type")
        record: Record | None = None
        if kind == "message":
            record = _fast_message(obj)
        elif kind == "send":  # the sink decodes every command
            record = _fast_send(obj)
        if record is not None:
            return record
    return parse(obj)


# ---------------------------------------------------------------- fast path
#
# Every record through the pipeline is a message, and the generic walk above
# (an _Obj and several method calls per field) costs several microseconds per
# record. The fast path checks the common shapes inline with the same rules,
# but never raises: on anything it does not accept (a defect, an unusual kind,
# a str or int subclass) it returns None and the caller runs the generic parser,
# which then raises exactly the error it always did. So it may be stricter than
# the generic path, never looser, and builds an equal record when it accepts.
# tests/test_codec.py compares both on valid and invalid records.


def _fast_network(value: Any) -> bool:
    return type(value) is str and (value in _NETWORKS_SEEN or _remember_network(value))


_NETWORKS_SEEN: set[str] = set()


def _remember_network(value: str) -> bool:
    if not NETWORK_RE.match(value):
        return False
    if len(_NETWORKS_SEEN) < 256:  # a handful of networks in practice; bounded anyway
        _NETWORKS_SEEN.add(value)
    return True


def _fast_id(value: Any) -> bool:
    """``_Obj.id`` (required) would accept it."""
    return type(value) is str and 0 < len(value) <= MAX_ID_LEN and "\x00" not in value


def _fast_optional(value: Any, max_len: int) -> bool:
    """``_Obj.str`` (not required) would accept it."""
    return value is None or (type(value) is str and len(value) <= max_len)


def _fast_label(value: Any) -> bool:
    """``_Obj.label`` would accept it."""
    return value is None or (type(value) is str and len(value) <= 255 and "\x00" not in value)


def _fast_optional_id(value: Any) -> bool:
    """``_Obj.id`` (not required) would accept it."""
    return value is None or (
        type(value) is str and len(value) <= MAX_ID_LEN and "\x00" not in value
    )


def _fast_url(value: Any) -> bool:
    """``_Obj.url`` would accept it (None included)."""
    return value is None or (
        type(value) is str and len(value) <= MAX_URL_LEN and URL_RE.match(value) is not None
    )


def _fast_text(value: Any) -> bool:
    """``_Obj.str(required=True)`` would accept it."""
    return type(value) is str and 0 < len(value) <= MAX_TEXT_LEN


def _fast_content(c: dict[str, Any]) -> Content | None:
    kind = c.get("kind")
    if kind == "text" or kind == "notice" or kind == "emote":
        body, html = c.get("body"), c.get("html")
        if _fast_text(body) and _fast_optional(html, MAX_TEXT_LEN):
            return Content(kind=kind, body=body, html=html)
    elif kind == "reaction":
        target, key = c.get("target"), c.get("key")
        if _fast_id(target) and type(key) is str and 0 < len(key) <= 255:
            return Content(kind=kind, target=target, key=key)
    elif kind == "edit":
        target, body, html = c.get("target"), c.get("body"), c.get("html")
        if _fast_id(target) and _fast_text(body) and _fast_optional(html, MAX_TEXT_LEN):
            return Content(kind=kind, target=target, body=body, html=html)
    elif kind == "redaction":
        target, reason = c.get("target"), c.get("reason")
        if _fast_id(target) and _fast_optional(reason, 1024):
            return Content(kind=kind, target=target, reason=reason)
    return None  # media, location, unknown kinds and any defect: generic path


def _fast_message(d: dict[str, Any]) -> NetworkMessage | None:
    """``_message`` for a valid message of a common shape, else None (see above)."""
    get = d.get
    sender, content, ts = get("sender"), get("content"), get("ts")
    if type(sender) is not dict or type(content) is not dict:
        return None
    network, portal, mid = get("network"), get("portal"), get("id")
    if not (_fast_network(network) and _fast_id(portal) and _fast_id(mid)):
        return None
    if type(ts) is not int or not MIN_TS <= ts < MAX_TS:
        return None
    sender_id, name, avatar = sender.get("id"), sender.get("name"), sender.get("avatar_url")
    if not (
        _fast_id(sender_id) and _fast_label(name) and _fast_url(avatar)
    ):
        return None
    body = _fast_content(content)
    if body is None:
        return None
    history, part = get("history"), get("part")
    if history is None:
        history = True
    elif type(history) is not bool:
        return None
    if part is None:
        part = 0
    elif type(part) is not int or not 0 <= part <= MAX_PART:
        return None
    reply_to, thread = get("reply_to"), get("thread")
    if not (_fast_optional_id(reply_to) and _fast_optional_id(thread)):
        return None
    return NetworkMessage(
        network=network,
        portal=portal,
        id=mid,
        sender=Sender(id=sender_id, name=name, avatar_url=avatar),
        ts=ts,
        content=body,
        history=history,
        part=part,
        reply_to=reply_to,
        thread=thread,
    )


def _fast_send(d: dict[str, Any]) -> SendMessage | None:
    """``schema._send`` for a send command around a common message, else None."""
    inner, seq = d.get("message"), d.get("seq")
    if type(inner) is not dict or inner.get("type", "message") != "message":
        return None
    if seq is None:
        seq = 0
    elif type(seq) is not int or seq < 0:
        return None
    message = _fast_message(inner)
    return None if message is None else SendMessage(message=message, seq=seq)

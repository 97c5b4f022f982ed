"""Decoding a fetched batch into ``Incoming`` records, and the dead letters of the rest.

CPU only (no I/O), so the agent decodes the next batch while one applies.
A record is refused here, before it reaches Postgres, when it does not decode
(topics.codec: which also refuses U+0000 in identifiers, the fields the hold
store keeps as Postgres ``text``) or does not belong on its topic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from topics.codec import RecordError, decode
from topics.deadletter import Stage, dead_letter, log_source
from topics.records import DeadLetter

# Which record types belong on which source topic (topics.catalog specs).
ALLOWED = {
    "history": ("message", "portal", "history_complete", "sync_complete"),
    "live": ("message", "portal"),
    "events": ("room_created",),
}


@dataclass(slots=True)
class Incoming:
    """One decoded record with where it came from."""

    record: object
    kind: str  # the source topic's role: "history", "live" or "events"
    partition: int
    offset: int
    raw: bytes = b""  # the original bytes, for a dead letter if processing fails
    topic: str = ""  # the source topic's real name (dead letters' source)

    @property
    def source(self) -> str:
        return log_source(self.topic or self.kind, self.partition, self.offset)


@dataclass(slots=True)
class Prepared:
    """A decoded batch: the records to apply and the dead letters to send."""

    size: int
    items: list[Incoming] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


def prepare(records: Sequence[Any], kinds: Mapping[str, str]) -> Prepared:
    """Decode and validate a batch; ``kinds`` maps a topic name to its role.

    A record is anything with ``topic``, ``partition``, ``offset``, ``key``
    and ``value`` (raw bytes): faust's Message, as the intake hands it on.
    """
    prepared = Prepared(len(records))
    items, letters = prepared.items, prepared.letters
    for msg in records:
        raw = msg.value if isinstance(msg.value, bytes) else b""
        kind = kinds.get(msg.topic, "history")
        try:
            record = decode(raw)
            if record.TYPE not in ALLOWED[kind]:
                raise RecordError("type", f"a {record.TYPE!r} record does not belong here")
        except RecordError as exc:
            letters.append(
                dead_letter(
                    Stage.PIPELINE,
                    str(exc),
                    raw,
                    source=log_source(msg.topic, msg.partition, msg.offset),
                    key=msg.key if isinstance(msg.key, bytes) else None,
                )
            )
            continue
        items.append(Incoming(record, kind, msg.partition, msg.offset, raw, msg.topic))
    return prepared

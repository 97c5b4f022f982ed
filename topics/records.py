"""Record schemas: the contracts between connectors, pipeline and sink.

Every record is one JSON object with a ``type`` field naming its schema. The
same shapes are what third-party connectors, the JSONL importer and the live
ingest endpoint speak (docs/records.md documents them field by field).

Records are plain dataclasses, treated as values: nothing changes a record
once built (``dataclasses.replace`` makes a new one). They are not declared
frozen because a frozen dataclass sets every field through
``object.__setattr__``, which made decoding a message 4.7 us instead of 2.6 us
(every message is decoded at least twice on its way to Matrix).
``topics.codec`` is the one place that turns them into bytes and back,
validating every field on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# Timestamps are Unix milliseconds, UTC. Anything outside these bounds is a
# unit mistake (seconds or microseconds) or garbage, never a real chat message.
MIN_TS = 946_684_800_000  # 2000-01-01
MAX_TS = 4_102_444_800_000  # 2100-01-01

MEDIA_TYPES = ("image", "file", "audio", "video")

# Content kinds that point at another message and so must never be sent
# before it (the pipeline enforces this when it releases a hold).
DEPENDENT_KINDS = ("reaction", "edit", "redaction")


@dataclass(slots=True)
class Sender:
    """A network user; the sink turns each one into a ghost."""

    id: str
    name: str | None = None
    avatar_url: str | None = None


@dataclass(slots=True)
class Content:
    """What a message says. ``kind`` decides which other fields matter.

    text / notice / emote: body, html
    media:     body (caption or file name), media_type, filename, mimetype,
               size, url or data (base64), width, height, duration_ms
    location:  body, lat, lon
    reaction:  target, key
    edit:      target, body, html
    redaction: target, reason
    """

    kind: str
    body: str | None = None
    html: str | None = None
    media_type: str | None = None
    filename: str | None = None
    mimetype: str | None = None
    size: int | None = None
    url: str | None = None
    data: str | None = None
    width: int | None = None
    height: int | None = None
    duration_ms: int | None = None
    lat: float | None = None
    lon: float | None = None
    target: str | None = None
    key: str | None = None
    reason: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = (
        "text",
        "notice",
        "emote",
        "media",
        "location",
        "reaction",
        "edit",
        "redaction",
    )


@dataclass(slots=True)
class Member:
    id: str
    name: str | None = None
    avatar_url: str | None = None


def portal_key(network: str, portal: str) -> str:
    """The Kafka key of everything about one portal: one partition, one owner."""
    return f"{network}:{portal}"


@dataclass(slots=True)
class NetworkMessage:
    """One message (or one part of one) as a network connector saw it."""

    TYPE: ClassVar[str] = "message"

    network: str
    portal: str
    id: str
    sender: Sender
    ts: int
    content: Content
    history: bool = True
    part: int = 0
    reply_to: str | None = None
    thread: str | None = None

    @property
    def key(self) -> str:
        return portal_key(self.network, self.portal)


@dataclass(slots=True)
class PortalMeta:
    """What a portal's room shows: name, topic, members. Shared by the
    connector's ``portal`` record and the pipeline's ``create_room`` command;
    neither is the other, so sources can never publish a command."""

    network: str
    portal: str
    name: str | None = None
    topic: str | None = None
    members: tuple[Member, ...] = ()
    avatar_url: str | None = None

    @property
    def key(self) -> str:
        return portal_key(self.network, self.portal)


@dataclass(slots=True)
class PortalInfo(PortalMeta):
    """Metadata of a portal (a bridged chat), as a connector saw it (an upsert)."""

    TYPE: ClassVar[str] = "portal"

    # The network's own "last activity" time of the chat (WhatsApp's conversation
    # lastMsgTimestamp), Unix ms: ranks it for max_initial_conversations when it is
    # later than its newest message in the log (the bridge may have deleted those).
    last_activity_ts: int | None = None


@dataclass(slots=True)
class HistoryComplete:
    """A connector has published all the history it has for a portal.

    It travels in the same partition as the portal's history, after it, so a
    processor that sees it has already seen every message before it.
    """

    TYPE: ClassVar[str] = "history_complete"

    network: str
    portal: str
    count: int = 0
    sync: str | None = None  # the import run (SyncComplete.sync) this belongs to

    @property
    def key(self) -> str:
        return portal_key(self.network, self.portal)


@dataclass(slots=True)
class SyncComplete:
    """A connector run finished: ``portals`` history_complete markers carry ``sync``.

    Decisions that need every portal of a run at once (which N portals get a
    room under ``max_initial_conversations``) wait for this.
    """

    TYPE: ClassVar[str] = "sync_complete"

    network: str
    sync: str
    portals: int

    @property
    def key(self) -> str:
        return f"{self.network}:sync:{self.sync}"


@dataclass(slots=True)
class RoomCreated:
    """The sink made (or found) the portal's Matrix room."""

    TYPE: ClassVar[str] = "room_created"

    network: str
    portal: str
    room_id: str
    alias: str | None = None
    # The newest network timestamp already bridged into this room, when the
    # room existed before (catch-up must only send what is newer).
    last_bridged_ts: int | None = None

    @property
    def key(self) -> str:
        return portal_key(self.network, self.portal)


@dataclass(slots=True)
class CreateRoom(PortalMeta):
    """Command to the sink: make sure the portal's room exists, showing this."""

    TYPE: ClassVar[str] = "create_room"

    # ``backflow replay --mode rebuild`` (never the pipeline): ``rebuild`` names
    # a rebuild that gives the portal a fresh room, which the sends after it
    # fill; a later ``finish_rebuild`` with the same name tombstones the old
    # room towards the new one and moves the portal's alias there.
    rebuild: str | None = None
    finish_rebuild: str | None = None


@dataclass(slots=True)
class SendMessage:
    """Command to the sink: put this message into the portal's room."""

    TYPE: ClassVar[str] = "send"

    message: NetworkMessage
    # Per-portal command sequence assigned by the pipeline: commands of one
    # portal are numbered 1, 2, 3 ... in the order the sink must apply them.
    seq: int = 0

    @property
    def key(self) -> str:
        return self.message.key


@dataclass(slots=True)
class DeadLetter:
    """A record some stage could not handle, with why, and its original bytes."""

    TYPE: ClassVar[str] = "dead_letter"

    stage: str
    reason: str
    original: str  # the original bytes, decoded as UTF-8 with replacement
    source: str | None = None  # topic, file:line, http request ...
    key: str | None = None
    ts: int = field(default=0)


Record = (
    NetworkMessage
    | PortalInfo
    | HistoryComplete
    | SyncComplete
    | RoomCreated
    | CreateRoom
    | SendMessage
    | DeadLetter
)

RECORD_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        NetworkMessage,
        PortalInfo,
        HistoryComplete,
        SyncComplete,
        RoomCreated,
        CreateRoom,
        SendMessage,
        DeadLetter,
    )
}

"""The source framework: everything a connector does not have to do itself.

``publish_source`` drives a ``Source``: validates each record with the one
codec, publishes it keyed by portal (history topic for history, live topic
for live), sends ``Rejected`` items and invalid records to the dead-letter
topic with the reason, and when the input is exhausted publishes one
``HistoryComplete`` per portal (behind that portal's messages in the same
partition) and one ``SyncComplete`` per network, so the pipeline knows the
run is whole. Memory stays flat: only per-portal counters are kept.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import orjson
from aiokafka import AIOKafkaProducer

from connectors.source import Rejected, Source
from topics import bus
from topics.codec import MAX_RECORD_BYTES, RecordError, encode, from_dict, to_dict
from topics.deadletter import DeadLetters, Stage
from topics.records import (
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    Record,
    SyncComplete,
)
from topics.schema import usable_key
from topics.settings import Settings

# Outstanding sends before we wait for acks: bounds memory, keeps batching.
WINDOW = 2_000


@dataclass
class ImportSummary:
    source: str
    portals: int = 0
    messages: int = 0  # every NetworkMessage published (what the rate counts)
    kinds: Counter[str] = field(default_factory=Counter)  # of those, by content kind
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    sync: str = ""
    # (network, portal) -> history messages published: what the markers say.
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"{self.source}: {describe_kinds(self.kinds)} in {self.portals} portals published"
            f" ({self.rate:,.0f} records/s), {self.rejected} rejected",
        ]
        out += [f"  {name}: {count}" for name, count in sorted(self.stats.items())]
        for reason, count in self.reasons.most_common(10):
            out.append(f"  rejected x{count}: {reason}")
        return out


Progress = Callable[[ImportSummary], None]
OnReject = Callable[[str, str], None]


def _reason_class(reason: str) -> str:
    """Group rejection reasons for the summary (drop the varying value part)."""
    return reason.split(":", 2)[0] if reason.startswith("field") else reason[:80]


class Publisher:
    """Publishes validated records for one run; shared by importers and ingest."""

    def __init__(
        self, settings: Settings, producer: AIOKafkaProducer, stage: Stage, decoded: bool = False
    ) -> None:
        self.settings = settings
        self.decoded = decoded  # records come from topics.codec.decode (Source.decoded)
        self.producer = producer
        self.catalog = settings.catalog
        self.dead_letters = DeadLetters(producer, self.catalog.dead_letters, stage)
        self.members_capped = 0  # members left out of portal records too big to publish
        self._pending: list = []

    async def send(self, topic: str, record: Record, key: str | None = None) -> None:
        """Queue one record; waits for acks every WINDOW records."""
        await self._track(await bus.send(self.producer, topic, record, key))

    async def _track(self, future: object) -> None:
        self._pending.append(future)
        if len(self._pending) >= WINDOW:
            await self.flush()

    async def flush(self) -> None:
        """Wait until the broker acknowledged everything queued so far."""
        pending, self._pending = self._pending, []
        for future in pending:
            await future

    async def record(self, record: NetworkMessage | PortalInfo) -> NetworkMessage | PortalInfo:
        """Validate a connector's record with the codec's rules and queue it.

        Raises RecordError when invalid; nothing is published then.
        """
        checked, data = check_record(record, self.decoded)
        if isinstance(checked, PortalInfo):
            self.members_capped += len(record.members) - len(checked.members)
        live = isinstance(checked, NetworkMessage) and not checked.history
        topic = self.catalog.live if live else self.catalog.history
        await self._track(await self.producer.send(topic, data, key=checked.key.encode()))
        return checked

    async def reject(
        self, where: str, reason: str, original: str | bytes, key: str | None = None
    ) -> None:
        """Dead-letter input that was refused; ``where`` is its file:line (or request)."""
        letter = self.dead_letters.build(reason, original, source=where, key=key)
        await self._track(await self.dead_letters.queue(letter))


def describe_kinds(kinds: Counter[str]) -> str:
    """'1376 messages, 199 reactions, 3 edits, 12 media' from counts by content kind.

    Reactions, edits, redactions and media are counted apart from messages,
    so "messages" means what a reader sees as a message.
    """
    apart = {"reaction": "reactions", "edit": "edits", "redaction": "redactions", "media": "media"}
    messages = sum(n for kind, n in kinds.items() if kind not in apart)
    parts = [f"{messages} messages"]
    parts += [f"{kinds[kind]} {word}" for kind, word in apart.items() if kinds.get(kind)]
    return ", ".join(parts)


def check_record(
    record: NetworkMessage | PortalInfo, decoded: bool = False
) -> tuple[NetworkMessage | PortalInfo, bytes]:
    """The record as the codec reads it back, and its bytes; RecordError if invalid.

    The one validation for everything a connector yields (publish and dry run):
    a portal record too big for the broker keeps as many members as fit.
    """
    plain = to_dict(record)
    if decoded:  # the connector built it with the codec's decode: validated already
        checked = record
    else:
        checked = from_dict(plain)
    assert isinstance(checked, NetworkMessage | PortalInfo)
    # The codec read back what the connector made: its dict is the encoding
    # (one to_dict per record, not two). Anything normalized is re-encoded.
    data = orjson.dumps(plain) if checked is record or checked == record else encode(checked)
    if len(data) > MAX_RECORD_BYTES:
        if not isinstance(checked, PortalInfo) or not checked.members:
            raise RecordError(
                "", f"record is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit"
            )
        checked, data = fit_members(checked, MAX_RECORD_BYTES)
    return checked, data


def fit_members(info: PortalInfo, limit: int) -> tuple[PortalInfo, bytes]:
    """The portal record with as many of its members as fit in ``limit`` bytes.

    Members left out are not lost to the room: the sink joins a ghost before
    it first speaks; the list only pre-joins those who never do. A record that
    does not fit even without members is refused.
    """
    keep = len(info.members)
    while True:
        keep = max(0, keep)
        trial = replace(info, members=info.members[:keep])
        data = encode(trial)
        if len(data) <= limit:
            return trial, data
        if keep == 0:
            raise RecordError("", f"record is {len(data)} bytes without members, over the limit")
        keep = min(keep - 1, keep * limit // len(data) - 1)


async def publish_source(
    source: Source,
    settings: Settings,
    progress: Progress | None = None,
    on_reject: OnReject | None = None,
    complete: bool = True,
) -> ImportSummary:
    """Run a source to the end and publish everything it yields.

    ``complete=False`` leaves out the run's markers (``summary.counts`` says
    what they would be): a follower publishes them later with
    :func:`publish_complete`, once the network has been quiet.
    """
    summary = ImportSummary(source=source.name, sync=uuid.uuid4().hex)
    started = time.monotonic()
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    counts: dict[tuple[str, str], int] = {}  # (network, portal) -> history messages
    publisher = Publisher(settings, producer, Stage.IMPORT, decoded=source.decoded)
    try:
        for n, item in enumerate(source.read(), start=1):
            if isinstance(item, Rejected):
                await _reject(
                    publisher, summary, on_reject, item.where, item.reason, item.original, item.key
                )
            else:
                try:
                    record = await publisher.record(item)
                except RecordError as exc:
                    original = to_dict_safe(item)
                    key = usable_key(getattr(item, "network", None), getattr(item, "portal", None))
                    where = source.at if isinstance(item, NetworkMessage) else None
                    where = where or f"{source.path.name} item {n}"
                    await _reject(publisher, summary, on_reject, where, str(exc), original, key)
                    continue
                portal = (record.network, record.portal)
                counts.setdefault(portal, 0)
                if isinstance(record, NetworkMessage):
                    summary.messages += 1
                    summary.kinds[record.content.kind] += 1
                    if record.history:
                        counts[portal] += 1
            if progress is not None and n % 1000 == 0:
                summary.portals = len(counts)
                summary.seconds = time.monotonic() - started
                progress(summary)
        await publisher.flush()
        if complete:
            await _markers(publisher, settings, counts, summary.sync)
    finally:
        await producer.stop()
    summary.portals = len(counts)
    summary.counts = counts
    summary.stats = dict(source.stats)
    if publisher.members_capped:
        summary.stats["members_capped"] = publisher.members_capped
    summary.seconds = time.monotonic() - started
    if progress is not None:
        progress(summary)
    return summary


async def _markers(
    publisher: Publisher, settings: Settings, counts: dict[tuple[str, str], int], sync: str
) -> None:
    # Markers go after the acks, so each follows its portal's history.
    networks: Counter[str] = Counter()
    for (network, portal), count in counts.items():
        marker = HistoryComplete(network, portal, count=count, sync=sync)
        await publisher.send(settings.catalog.history, marker)
        networks[network] += 1
    await publisher.flush()
    for network, portals in networks.items():
        done = SyncComplete(network=network, sync=sync, portals=portals)
        await publisher.send(settings.catalog.history, done)
    await publisher.flush()


async def publish_complete(
    settings: Settings, counts: dict[tuple[str, str], int], sync: str | None = None
) -> str:
    """One sync's markers for history published earlier (``complete=False`` runs); its id."""
    sync = sync or uuid.uuid4().hex
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        await _markers(Publisher(settings, producer, Stage.IMPORT), settings, counts, sync)
    finally:
        await producer.stop()
    return sync


def to_dict_safe(item: object) -> str:
    try:
        return orjson.dumps(to_dict(item)).decode()  # type: ignore[arg-type]
    except Exception:  # the item is broken in ways the encoder rejects too
        return repr(item)


async def _reject(
    publisher: Publisher,
    summary: ImportSummary,
    on_reject: OnReject | None,
    where: str,
    reason: str,
    original: str | bytes,
    key: str | None = None,
) -> None:
    summary.rejected += 1
    summary.reasons[_reason_class(reason)] += 1
    await publisher.reject(where, reason, original, key)
    if on_reject is not None:
        on_reject(where, reason)

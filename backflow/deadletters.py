"""Reading the dead-letter topic back, and re-publishing what can go through now.

Dead letters are built by topics/deadletter.py: stage, reason, source
(``topic[partition]@offset``, ``file:line`` or ``http:<peer>``), portal key,
time, and a bounded excerpt of the original. A dead letter is named by where
it sits in the dead-letter topic (``<topic>[partition]@offset``).

Retry re-checks each selected dead letter the way a stage first reads a
record (the one codec, ``topics.codec.decode``, and the record types the
target topic carries). One that passes now is re-published to the topic it
came from; one that still fails is listed with today's reason and stays. A
retry ledger in Postgres (``deadletter_retries``) re-publishes each dead
letter at most once; the ledger row is written after the broker's ack, so a
crash in between re-publishes again, which the stages absorb: the hold store
drops duplicate message ids and the sink its already-sent messages.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from aiokafka import TopicPartition

from topics import bus
from topics.admin import broker_topics, open_admin
from topics.catalog import Catalog
from topics.codec import RecordError, decode
from topics.deadletter import EXCERPT_CHARS
from topics.records import DeadLetter, NetworkMessage, PortalInfo, Record
from topics.settings import Settings

LEDGER = """
CREATE TABLE IF NOT EXISTS deadletter_retries (
    letter      text PRIMARY KEY,
    topic       text NOT NULL,
    retried_at  timestamptz NOT NULL DEFAULT now()
)
"""

_SOURCE_TOPIC = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\[\d+\]@\d+$")
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
TRUNCATED = re.compile(r"\.\.\. \[\d+ more characters\]$")


class DeadLetterError(RuntimeError):
    """An operator-facing failure of a dead-letter command (one line)."""


def parse_when(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch from ``2024-05-01``, ``2024-05-01T12:00``, or ``3h`` ago."""
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        seconds = int(relative.group(1)) * _UNITS[relative.group(2)]
        return int(((now if now is not None else time.time()) - seconds) * 1000)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DeadLetterError(
            f"cannot read {text!r} as a time: use 2024-05-01, 2024-05-01T12:00 or 3h / 2d ago"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters a command applies to; every given field must match."""

    stage: str | None = None
    reason: str | None = None  # substring, any case
    source: str | None = None  # substring
    key: str | None = None  # the portal key, exactly
    since: int | None = None  # ms, inclusive
    until: int | None = None  # ms, exclusive

    def matches(self, letter: DeadLetter) -> bool:
        if self.stage is not None and letter.stage != self.stage:
            return False
        if self.reason is not None and self.reason.lower() not in letter.reason.lower():
            return False
        if self.source is not None and self.source not in (letter.source or ""):
            return False
        if self.key is not None and letter.key != self.key:
            return False
        if self.since is not None and letter.ts < self.since:
            return False
        return self.until is None or letter.ts < self.until


@dataclass(frozen=True, slots=True)
class Stored:
    """A dead letter and where it sits in the dead-letter topic."""

    id: str  # <topic>[partition]@offset
    letter: DeadLetter


@dataclass
class Scan:
    """Counts of one pass over the topic (unreadable entries are counted, not fatal)."""

    read: int = 0
    matched: int = 0
    unreadable: int = 0


async def scan(
    settings: Settings, where: Filter, stats: Scan | None = None
) -> AsyncIterator[Stored]:
    """Every matching dead letter, oldest offset first per partition, up to today's end.

    Reads without a consumer group (nothing committed); memory holds one
    fetch at a time, whatever the topic's size.
    """
    stats = stats if stats is not None else Scan()
    topic = settings.catalog.dead_letters
    count = await partition_count(settings, topic)
    consumer = bus.reader(settings, max_poll_records=500)
    await bus.start(consumer, settings)
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        async for m in bus.read_to_end(consumer, ends):
            stats.read += 1
            try:
                letter = decode(m.value)
            except RecordError:
                stats.unreadable += 1
                continue
            if not isinstance(letter, DeadLetter):
                stats.unreadable += 1
                continue
            if where.matches(letter):
                stats.matched += 1
                yield Stored(f"{m.topic}[{m.partition}]@{m.offset}", letter)
    finally:
        await consumer.stop()


async def partition_count(settings: Settings, topic: str) -> int:
    """The topic's partitions as the broker has them (an all-topics listing: creates nothing)."""
    admin = await open_admin(bus.bootstrap(settings))
    try:
        present = await broker_topics(admin)
    finally:
        await admin.close()
    if topic not in present:
        raise DeadLetterError(
            f"no topic {topic} on the Kafka broker at {settings.kafka.bootstrap}: "
            "create it with `backflow topics provision`"
        )
    return present[topic].partitions


async def find(settings: Settings, letter_id: str) -> Stored | None:
    """The dead letter named ``<topic>[partition]@offset`` (or ``partition@offset``)."""
    short = f"[{letter_id.replace('@', ']@')}"
    async with aclosing(scan(settings, Filter())) as letters:
        async for stored in letters:
            if stored.id == letter_id or stored.id.endswith(short):
                return stored
    return None


class NotRetryable(Exception):
    pass


def retry_target(catalog: Catalog, letter: DeadLetter) -> tuple[str, Record, bytes]:
    """Where the original goes now, the record and its bytes; NotRetryable or RecordError.

    RecordError means the cause is not fixed: the codec still refuses it.
    """
    if len(letter.original) > EXCERPT_CHARS and TRUNCATED.search(letter.original):
        raise NotRetryable("only an excerpt of the original was kept (it was too big)")
    data = letter.original.encode()
    try:
        record = decode(data)
    except RecordError:
        if letter.stage == "import" and not letter.original.lstrip().startswith("{"):
            raise NotRetryable(
                "the original is a line of the export, not a record: fix the file and import "
                "it again"
            ) from None
        raise
    if isinstance(record, DeadLetter):
        raise NotRetryable("the original is itself a dead letter")
    specs = {s.name: s for s in catalog.specs()}
    source = _SOURCE_TOPIC.match(letter.source or "")
    if source and source.group("topic") in specs:
        spec = specs[source.group("topic")]
        if record.TYPE in spec.values:
            return spec.name, record, data
    if isinstance(record, NetworkMessage):
        return (catalog.history if record.history else catalog.live), record, data
    if isinstance(record, PortalInfo):
        return catalog.history, record, data
    for spec in catalog.specs():
        if spec.name != catalog.dead_letters and record.TYPE in spec.values:
            return spec.name, record, data
    raise NotRetryable(f"no topic carries {record.TYPE!r} records")


@dataclass
class RetryResult:
    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)  # the first MAX_LINES outcomes
    scan: Scan = field(default_factory=Scan)

    MAX_LINES = 200

    def note(self, outcome: str, letter_id: str, detail: str) -> None:
        self.counts[outcome] += 1
        if len(self.lines) < self.MAX_LINES:
            self.lines.append(f"{outcome:16} {letter_id}: {detail}")


async def retry(settings: Settings, where: Filter, dry_run: bool = False) -> RetryResult:
    """Re-publish the matching dead letters whose original passes now (each at most once)."""
    if not settings.database.url:
        raise DeadLetterError(
            "no database configured for the retry ledger: set database.url (BACKFLOW_DATABASE_URL)"
        )
    try:
        db = await asyncpg.connect(settings.database.url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DeadLetterError(f"cannot reach the database: {exc}") from None
    result = RetryResult()
    producer = bus.producer(settings)
    try:
        await db.execute(LEDGER)
        await bus.start(producer, settings)
        async for stored in scan(settings, where, result.scan):
            await _retry_one(settings, db, producer, stored, result, dry_run)
    finally:
        await producer.stop()
        await db.close()
    return result


async def _retry_one(
    settings: Settings,
    db: asyncpg.Connection,
    producer: object,
    stored: Stored,
    result: RetryResult,
    dry_run: bool,
) -> None:
    done = await db.fetchval("SELECT topic FROM deadletter_retries WHERE letter = $1", stored.id)
    if done is not None:
        result.note("already retried", stored.id, f"re-published to {done} before")
        return
    try:
        topic, record, data = retry_target(settings.catalog, stored.letter)
    except NotRetryable as exc:
        result.note("not retryable", stored.id, str(exc))
        return
    except RecordError as exc:
        result.note("still failing", stored.id, str(exc))
        return
    if dry_run:
        result.note("would retry", stored.id, f"{record.TYPE} to {topic}")
        return
    key = getattr(record, "key", None) or stored.letter.key or stored.letter.stage
    await (await producer.send(topic, data, key=key.encode()))  # type: ignore[attr-defined]
    await db.execute(
        "INSERT INTO deadletter_retries (letter, topic) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        stored.id,
        topic,
    )
    result.note("republished", stored.id, f"{record.TYPE} to {topic}")

"""`backflow replay --mode catchup`: re-read portals' history from the log, fill the gaps.

The log is the truth (history and live topics, kept forever, keyed by
portal); the hold store is not needed and may be empty or lost. For each
selected portal with a room in the sink's store, this reads the portal's
messages from the log, asks the sink's message map which of them the room
has, and lets ``backflow.replay_plan.plan_catchup`` decide what to send.
What it decides goes to the sink's command topic as ``SendMessage`` records
with ``seq`` 0: the sink's exactly-once path (map, intents, deterministic
txn ids) does the sending, and seq 0 lies outside the pipeline's per-portal
numbering (1, 2, 3 ...), so the pipeline's read-back of the command log
never takes a replay command for one of its own.

The selection, the log reader and the map lookups here are shared with
``--mode rebuild`` (backflow/rebuild.py).

Memory: only messages that could still be sent are kept (not delivered, not
older than the room's last bridged message, inside --since/--until), at most
``MAX_CANDIDATES`` per run; the log is read one fetch at a time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from backflow.deadletters import partition_count
from backflow.replay_plan import DELIVERED, CatchupPlan, part_key, plan_catchup
from connectors.matrix.store import SinkStore, StoreUnreachable
from pipeline.portal import BEFORE_LAST_BRIDGED
from topics import bus
from topics.codec import RecordError, decode, encode
from topics.records import CreateRoom, NetworkMessage, SendMessage
from topics.settings import Settings

log = logging.getLogger("backflow.replay")

MAX_CANDIDATES = 200_000
LOOKUP_CHUNK = 5_000
# On Apache Kafka the scan may start at offsets_for_times(t - SKEW): a record's
# Kafka timestamp is when it was produced, which is never before the network
# time of the message it carries (history is published after the fact),
# give or take the source's clock error.
SKEW_MS = 24 * 3600 * 1000


class ReplayError(RuntimeError):
    """An operator-facing failure of a replay (one line)."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which portals and which part of their history a replay covers."""

    portals: tuple[str, ...] = ()  # portal keys network:portal (or room id / alias)
    network: str | None = None
    all: bool = False
    since: int | None = None  # network ts, ms, inclusive
    until: int | None = None  # network ts, ms, exclusive

    def in_window(self, ts: int) -> bool:
        if self.since is not None and ts < self.since:
            return False
        return self.until is None or ts < self.until


@dataclass(slots=True)
class PortalReplay:
    key: str
    room_id: str
    last_bridged_ts: int | None
    candidates: list[NetworkMessage] = field(default_factory=list)
    # Logged messages older than the room's last bridged one: never kept, only
    # counted, looked up a chunk at a time (in the room already, or lost to it).
    old_keys: set[tuple[str, int]] = field(default_factory=set)
    old_delivered: int = 0
    old_lost: int = 0
    delivered: set[tuple[str, int]] = field(default_factory=set)  # of the candidates, in the map
    plan: CatchupPlan | None = None
    published: int = 0


@dataclass(slots=True)
class ReplayResult:
    portals: list[PortalReplay] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # selected, but no room in the sink
    read: int = 0  # log records read
    unreadable: int = 0


async def open_store(settings: Settings) -> SinkStore:
    """The sink's store (its message map and rooms), or one clear ReplayError."""
    try:
        return await SinkStore.open(settings.database.url, size=2)
    except StoreUnreachable as exc:
        raise ReplayError(str(exc)) from None


async def replay_catchup(
    settings: Settings, selection: Selection, dry_run: bool = False
) -> ReplayResult:
    """Plan (and unless ``dry_run`` publish) the catch-up of every selected portal."""
    store = await open_store(settings)
    result = ReplayResult()
    try:
        portals = await select(store, selection, result)
        if portals:
            await _read_history(settings, store, selection, portals, result)
            for p in portals.values():
                p.delivered = await look_up(store, p.room_id, p.key, p.candidates)
    finally:
        await store.close()
    if portals:
        queued = await _queued(settings, portals)
        for p in portals.values():
            p.plan = plan_catchup(
                p.candidates,
                delivered=p.delivered,
                last_bridged_ts=p.last_bridged_ts,
                backfill=settings.backfill,
                queued=queued.get(p.key, set()),
            )
            p.plan.skipped[DELIVERED] += p.old_delivered
            p.plan.skipped[BEFORE_LAST_BRIDGED] += p.old_lost
            p.plan.skipped += Counter()  # drops the zero counts
        if not dry_run:
            await _publish(settings, portals.values())
    result.portals = sorted(portals.values(), key=lambda p: p.key)
    return result


async def select(
    store: SinkStore, selection: Selection, result: ReplayResult
) -> dict[str, PortalReplay]:
    rows = []
    if selection.all or (selection.network and not selection.portals):
        rows = list(await store.rooms(selection.network))
    for value in selection.portals:
        row = await store.room_by_alias_or_id(value)
        if row is None or (selection.network and row["network"] != selection.network):
            result.missing.append(value)
        else:
            rows.append(row)
    portals: dict[str, PortalReplay] = {}
    for row in rows:
        key = row["portal_key"]
        if key not in portals:
            last = await store.last_bridged_ts(row["room_id"], key)
            portals[key] = PortalReplay(key, row["room_id"], last)
    return portals


async def _read_history(
    settings: Settings,
    store: SinkStore,
    selection: Selection,
    portals: dict[str, PortalReplay],
    result: ReplayResult,
) -> None:
    catalog = settings.catalog
    kept = 0
    async for _, value in read_log(
        settings, [catalog.history, catalog.live], set(portals), _scan_from(selection, portals)
    ):
        result.read += 1
        try:
            record = decode(value)
        except RecordError:
            result.unreadable += 1  # the pipeline dead-lettered it when it first came
            continue
        if not isinstance(record, NetworkMessage) or record.key not in portals:
            continue
        if not selection.in_window(record.ts):
            continue
        p = portals[record.key]
        if p.last_bridged_ts is not None and record.ts < p.last_bridged_ts:
            # Matrix only appends: it can never be sent there; count it.
            p.old_keys.add(part_key(record))
            if len(p.old_keys) >= LOOKUP_CHUNK:
                await _count_old(store, p)
            continue
        kept += 1
        if kept > MAX_CANDIDATES:
            raise ReplayError(
                f"more than {MAX_CANDIDATES} messages could be sent in one run: "
                "narrow it with --portal, --network, --since / --until"
            )
        p.candidates.append(record)
    for p in portals.values():
        await _count_old(store, p)


async def _count_old(store: SinkStore, p: PortalReplay) -> None:
    if p.old_keys:
        found = await store.lookup(p.room_id, p.key, sorted(p.old_keys))
        p.old_delivered += len(found)
        p.old_lost += len(p.old_keys) - len(found)
        p.old_keys.clear()


def _scan_from(selection: Selection, portals: dict[str, PortalReplay]) -> int | None:
    """The earliest network time any selected portal still needs (None: from the start)."""
    starts = []
    for p in portals.values():
        bounds = [b for b in (selection.since, p.last_bridged_ts) if b is not None]
        if not bounds:
            return None
        starts.append(max(bounds))
    return min(starts) if starts else None


async def look_up(
    store: SinkStore, room_id: str, key: str, messages: Sequence[NetworkMessage]
) -> set[tuple[str, int]]:
    """Which of these messages, and of their dependents' targets, the map has in the room."""
    keys = {part_key(m) for m in messages}
    keys |= {(m.content.target, 0) for m in messages if m.content.target}
    wanted = sorted(keys)
    delivered: set[tuple[str, int]] = set()
    for i in range(0, len(wanted), LOOKUP_CHUNK):
        found = await store.lookup(room_id, key, wanted[i : i + LOOKUP_CHUNK])
        delivered |= set(found)
    return delivered


async def _queued(
    settings: Settings, portals: dict[str, PortalReplay]
) -> dict[str, set[tuple[str, int]]]:
    """Candidates already in the command log, on their way to the sink."""
    wanted = {p.key: {part_key(m) for m in p.candidates} for p in portals.values()}
    out: dict[str, set[tuple[str, int]]] = {}
    start = min((m.ts for p in portals.values() for m in p.candidates), default=None)
    if start is None:
        return out
    topic = settings.catalog.matrix_commands
    async for _, value in read_log(settings, [topic], set(portals), start):
        try:
            command = decode(value)
        except RecordError:
            continue
        if isinstance(command, SendMessage) and command.key in wanted:
            k = part_key(command.message)
            if k in wanted[command.key]:
                out.setdefault(command.key, set()).add(k)
        elif isinstance(command, CreateRoom) and command.rebuild is not None:
            # Sends before a rebuild's start went to the room it replaced.
            out.pop(command.key, None)
    return out


async def _publish(settings: Settings, portals: Iterable[PortalReplay]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        for p in portals:
            assert p.plan is not None
            futures = [
                await producer.send(
                    settings.catalog.matrix_commands,
                    encode(SendMessage(message=m, seq=0)),
                    key=p.key.encode(),
                )
                for m in p.plan.send
            ]
            for f in futures:
                await f
            p.published = len(futures)
    finally:
        await producer.stop()


async def read_log(
    settings: Settings, topics: Sequence[str], keys: set[str], from_ms: int | None
) -> AsyncIterator[tuple[str, bytes]]:
    """(key, value) of every record keyed by one of ``keys``, up to today's end.

    Without a consumer group (nothing committed). On the mock broker every
    partition is read from the beginning; on Apache Kafka from
    ``offsets_for_times(from_ms - SKEW_MS)`` when ``from_ms`` is given.
    """
    wanted = {k.encode() for k in keys}
    partitions = [
        TopicPartition(t, p) for t in topics for p in range(await partition_count(settings, t))
    ]
    consumer = bus.reader(settings, max_poll_records=500)
    await bus.start(consumer, settings)
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await _seek(settings, consumer, partitions, ends, from_ms)
        async for m in bus.read_to_end(consumer, ends):
            if m.key in wanted and m.value is not None:
                yield m.key.decode(), m.value
    finally:
        await consumer.stop()


async def _seek(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    ends: dict[TopicPartition, int],
    from_ms: int | None,
) -> None:
    if from_ms is None or settings.kafka.mock_broker:
        # The mock cluster cannot look offsets up by time: scan and filter.
        await consumer.seek_to_beginning(*partitions)
        return
    try:
        found = await consumer.offsets_for_times(
            {tp: max(0, from_ms - SKEW_MS) for tp in partitions}
        )
    except Exception as exc:  # an older broker: UnsupportedVersionError and kin
        log.warning("offsets_for_times failed (%s): reading from the beginning", exc)
        await consumer.seek_to_beginning(*partitions)
        return
    begins = await consumer.beginning_offsets(partitions)
    doubtful = [tp for tp in partitions if found.get(tp) is None and ends[tp] > begins[tp]]
    probe = await consumer.offsets_for_times({tp: 0 for tp in doubtful}) if doubtful else {}
    starts = start_offsets(partitions, found, probe, begins, ends)
    if any(probe.get(tp) is None for tp in doubtful):
        log.warning("the broker cannot look offsets up by time: scanning from the start")
    for tp, offset in starts.items():
        consumer.seek(tp, offset)


def start_offsets(
    partitions: Sequence[TopicPartition],
    found: Mapping[TopicPartition, OffsetAndTimestamp | None],
    probe: Mapping[TopicPartition, OffsetAndTimestamp | None],
    begins: Mapping[TopicPartition, int],
    ends: Mapping[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """Where to start each partition from offsets_for_times' answers.

    ``found``: the answer for the wanted time. None there means no record at
    or after it (start at the end), or a broker that cannot look offsets up
    by time and answers None to everything (librdkafka's mock cluster does).
    ``probe`` tells which: the answer for time 0 for each non-empty partition
    ``found`` had None for; every record has a time >= 0, so None again means
    the broker is blind and the partition is read from its beginning.
    """
    out: dict[TopicPartition, int] = {}
    for tp in partitions:
        hit = found.get(tp)
        if hit is not None:
            out[tp] = hit.offset
        elif ends[tp] > begins[tp] and probe.get(tp) is None:
            out[tp] = begins[tp]
        else:
            out[tp] = ends[tp]
    return out

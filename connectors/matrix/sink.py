"""The Matrix sink connector: matrix-commands in, the homeserver made to match, exactly once.

It implements the sink contract (``connectors.sink.SinkTask``); the runtime
(``connectors.sink_runtime``) consumes the topic and commits what ``flush``
says is durable. The parts, one module each:

* ``offsets``: a partition's commit position never passes an unfinished
  command (event id in the map, dead letter acknowledged, RoomCreated acked).
* ``queues``: one queue per portal, drained by one worker task, so a room's
  commands run strictly in order; bounded per room.
* ``reread``: a full room's portal is parked on its partition (the others of
  that partition keep flowing) and re-read on its own once it has drained.
* ``ghosts`` / ``rooms``: ghost registration and profiles; portal rooms and
  membership.
* ``send``: exactly once per (room, portal, message id, part): skip what is in
  the map, write an intent, send with a deterministic txn id, record the
  event id and drop the intent in one transaction.
* ``settle``: sends in doubt (a crash, a failure without an answer) are looked
  for in the room before being sent again.
* ``content``: record -> Matrix event content and relations (pure).
* ``runner``: wiring and ``run_sink``.

A semaphore of ``sink.max_rooms_in_flight`` bounds how many rooms have a
homeserver request on the wire; it is taken per request (not per batch) so
rooms progress evenly, and given back while a 429 is waited out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from connectors.matrix.calls import room_slot
from connectors.matrix.client import MatrixClient
from connectors.matrix.ghosts import Ghosts, parse_templates
from connectors.matrix.offsets import OffsetTracker
from connectors.matrix.queues import ROOM_BUFFER, PortalQueue, WorkItem
from connectors.matrix.registration import Registration
from connectors.matrix.reread import Parked, commit_position, read_portal
from connectors.matrix.rooms import Rooms
from connectors.matrix.send import MessageSender, refused_for_good
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import SinkStore
from connectors.sink import SinkTask
from topics import bus
from topics.codec import RecordError, decode
from topics.deadletter import DeadLetters, Stage, log_source
from topics.logs import fields
from topics.records import CreateRoom, SendMessage
from topics.settings import Settings

log = logging.getLogger("backflow.sink")

# A memory bound on top of the per-room one (many rooms each just under theirs).
MAX_BUFFERED = 50_000
MAX_PARKED_SPAN = 20_000  # records the main consumer may run past a parked floor
RETRY_DELAY = 1.0  # seconds before a batch that hit transient trouble is retried
CLOSE_TIMEOUT = 20.0  # seconds a revoked partition's in-flight commands may take


class SinkError(Exception):
    """A startup problem the operator must fix (one line, no traceback)."""


def naming_templates(
    settings: Settings, registration: Registration
) -> tuple[dict[str, str], dict[str, str]]:
    """The sink's ghost and alias templates, checked against the registration's namespaces."""
    try:
        ghosts = parse_templates(
            settings.sink.ghost_templates, "sink.ghost_templates", registration.user_prefix
        )
        aliases = parse_templates(
            settings.sink.alias_templates, "sink.alias_templates", registration.alias_prefix
        )
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    return ghosts, aliases


class MatrixSink(SinkTask):
    def __init__(
        self,
        settings: Settings,
        registration: Registration,
        client: MatrixClient,
        store: SinkStore,
        producer: AIOKafkaProducer,
        stats: SinkStats,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.stats = stats
        self.tracker = OffsetTracker()
        self.portals: dict[str, PortalQueue] = {}
        self.parked: dict[tuple[str, TopicPartition], Parked] = {}
        self.seen: dict[TopicPartition, int] = {}  # the main consumer's next offset
        self.closing: set[TopicPartition] = set()  # revoked, not forgotten yet
        self.turns = asyncio.Semaphore(max(1, settings.sink.max_rooms_in_flight))
        self.stopping = False
        self.dead_letters = DeadLetters(
            producer, settings.catalog.dead_letters, Stage.SINK, scrub=client.scrub
        )
        ghost_templates, alias_templates = naming_templates(settings, registration)
        self.ghosts = Ghosts(client, store, registration.user_prefix, ghost_templates)
        self.rooms = Rooms(
            client,
            store,
            self.ghosts,
            stats,
            producer,
            settings.catalog.portal_events,
            registration.alias_prefix,
            alias_templates,
        )
        self.sender = MessageSender(
            client, store, self.ghosts, self.rooms, stats, self.turns, self.item_dead_letter
        )

    # ------------------------------------------------------------ the contract

    async def put(self, records: Sequence[ConsumerRecord]) -> None:
        for msg in records:
            await self.dispatch(msg)

    def flush(self) -> dict[TopicPartition, int]:
        positions = self.tracker.positions()
        floors: dict[TopicPartition, list[int]] = {}
        for parked in self.parked.values():
            floor = parked.floor()
            if floor is not None:
                floors.setdefault(parked.tp, []).append(floor)
        for tp, low in floors.items():
            at = commit_position(positions.get(tp), self.tracker.first_pending(tp), low)
            if at is not None:
                positions[tp] = at
        return positions

    def full(self) -> set[TopicPartition]:
        # A single full room is parked (reread.py), so the rest of its partition
        # keeps flowing. Fetching pauses for the memory bound, and where the main
        # consumer has run MAX_PARKED_SPAN past a parked floor (all of that would
        # be consumed again after a restart).
        if self.pending() > MAX_BUFFERED:
            return self.tracker.partitions()
        paused: set[TopicPartition] = set()
        for parked in self.parked.values():
            floor = parked.floor()
            if floor is not None and self.seen.get(parked.tp, 0) - floor > MAX_PARKED_SPAN:
                paused.add(parked.tp)
        return paused

    def pending(self) -> int:
        parked = sum(p.tracker.pending + p.active for p in self.parked.values())
        return self.tracker.pending + parked

    async def close(self, partitions: set[TopicPartition]) -> None:
        # Finish what we started for these partitions, so the next owner starts
        # after it (anything unfinished is settled by the next owner).
        # Parked portals stay parked (their floor holds the commit back) until
        # forget(); the next owner reads them from the committed position.
        self.closing |= partitions
        await self._cancel_readers(self._parked_on(partitions))
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while self._pending_in(partitions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def forget(self, partitions: set[TopicPartition]) -> None:
        self.tracker.forget(partitions)
        for parked in self._parked_on(partitions):
            del self.parked[(parked.key, parked.tp)]
        # Queued commands of those partitions are the next owner's now (their
        # offsets are not committed): drop them, so two processes never work
        # on one room. A batch already on the wire finishes.
        for portal in self.portals.values():
            if any(item.tp in partitions for item in portal.queue):
                portal.queue = deque(i for i in portal.queue if i.tp not in partitions)
        for tp in partitions:
            self.seen.pop(tp, None)
        self.closing -= partitions

    async def _cancel_readers(self, parked: list[Parked]) -> None:
        readers = [p.reader for p in parked if p.reader is not None and not p.reader.done()]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    def _parked_on(self, partitions: set[TopicPartition]) -> list[Parked]:
        return [p for p in self.parked.values() if p.tp in partitions]

    def _pending_in(self, partitions: set[TopicPartition]) -> int:
        parked = sum(p.tracker.pending for p in self._parked_on(partitions))
        return self.tracker.pending_in(partitions) + parked

    async def stop(self) -> None:
        # Let workers finish their current batch; what is unfinished is redelivered.
        self.stopping = True
        await self._cancel_readers(list(self.parked.values()))
        await self.drain(timeout=30)
        for portal in list(self.portals.values()):
            if portal.task is not None and not portal.task.done():
                portal.task.cancel()

    # ------------------------------------------------------------ dispatch

    async def dispatch(self, msg: ConsumerRecord) -> None:
        tp = TopicPartition(msg.topic, msg.partition)
        self.seen[tp] = msg.offset + 1
        raw: bytes = msg.value or b""
        source = log_source(msg.topic, msg.partition, msg.offset)
        reason: str | None = None
        try:
            command = decode(raw)
        except RecordError as exc:
            reason = f"malformed command: {exc}"
        else:
            if not isinstance(command, CreateRoom | SendMessage):
                reason = f"unexpected record type {command.TYPE!r} on the command topic"
        if reason is not None:
            self.tracker.add(tp, msg.offset)
            await self._dead_letter(reason, raw, msg.key, source)
            self.tracker.done(tp, msg.offset)
            return
        assert isinstance(command, CreateRoom | SendMessage)
        parked = self.parked.get((command.key, tp))
        if parked is not None and parked.active:
            return  # its reader hands it over later (the commit floor keeps it)
        self.tracker.add(tp, msg.offset)
        self.stats.commands += 1
        if self.stats.first_command is None:
            self.stats.first_command = time.monotonic()
        portal = self.enqueue(WorkItem(tp, msg.offset, raw, command))
        if len(portal.queue) >= ROOM_BUFFER:
            # Full: park the portal here instead of pausing the whole partition.
            if parked is None:
                self.parked[(command.key, tp)] = Parked(command.key, tp, msg.offset + 1)
            else:  # still finishing what its last reader handed over
                parked.active, parked.next_offset = True, msg.offset + 1
            where = fields(command.key)
            log.info("portal %s: room backed up, parked on %s", command.key, tp, extra=where)

    def enqueue(self, item: WorkItem) -> PortalQueue:
        key = item.command.key
        portal = self.portals.get(key)
        if portal is None:
            portal = self.portals[key] = PortalQueue(key)
        portal.push(item)
        if portal.task is None or portal.task.done():
            portal.task = asyncio.create_task(self._run_portal(portal), name=f"sink:{key}")
        return portal

    # ------------------------------------------------------------ parked portals

    def _queued(self, key: str) -> int:
        portal = self.portals.get(key)
        return len(portal.queue) if portal is not None else 0

    def _resume_parked(self, key: str) -> None:
        """A drained room whose portal is parked: start its reader."""
        if self._queued(key) >= ROOM_BUFFER // 2 or self.stopping:
            return
        for parked in list(self.parked.values()):
            if (
                parked.key == key
                and parked.active
                and not parked.reading
                and parked.tp not in self.closing
            ):
                parked.reader = asyncio.create_task(
                    self._reread(parked), name=f"sink-reread:{key}"
                )

    async def _reread(self, parked: Parked) -> None:
        def hand_over(record: ConsumerRecord) -> None:
            raw: bytes = record.value or b""
            try:
                command = decode(raw)
            except RecordError:
                return  # the main consumer dead-lettered it
            if not isinstance(command, CreateRoom | SendMessage) or command.key != parked.key:
                return
            parked.tracker.add(parked.tp, record.offset)
            self.stats.commands += 1
            self.enqueue(WorkItem(parked.tp, record.offset, raw, command, reread=True))

        consumer = bus.reader(self.settings)
        why = "failed"
        try:
            await bus.start(consumer, self.settings)
            why = await read_portal(
                parked,
                consumer,
                seen=lambda: self.seen.get(parked.tp, 0),
                room_full=lambda: self._queued(parked.key) >= ROOM_BUFFER,
                hand_over=hand_over,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            where = fields(parked.key)
            what = ("portal %s: re-reading %s failed (%r)", parked.key, parked.tp, exc)
            log.warning(*what, extra=where)
        finally:
            await consumer.stop()
        if why in ("failed", "idle"):
            await asyncio.sleep(RETRY_DELAY)  # then a new reader (still parked)
        parked.reader = None
        if not parked.active:
            where = fields(parked.key)
            log.info("portal %s: caught up on %s, unparked", parked.key, parked.tp, extra=where)
        self._drop_parked_if_done(parked)
        self._resume_parked(parked.key)  # a failed or idle room's reader goes on

    def _drop_parked_if_done(self, parked: Parked) -> None:
        key = (parked.key, parked.tp)
        if self.parked.get(key) is parked and parked.floor() is None and not parked.reading:
            del self.parked[key]

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for every queued command to finish."""
        tasks = [p.task for p in self.portals.values() if p.task and not p.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _run_portal(self, portal: PortalQueue) -> None:
        while portal.queue and not self.stopping:
            batch = portal.take_batch()
            self._resume_parked(portal.key)
            try:
                await self._process(portal, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                permanent = refused_for_good(exc)
                if permanent and len(batch) > 1:
                    # Something in the batch is refused for good (e.g. a value
                    # Postgres rejects): go one command at a time to find it.
                    log.warning(
                        "portal %s: batch refused (%s); one by one",
                        portal.key,
                        exc,
                        extra=fields(portal.key),
                    )
                    portal.room = None
                    for item in reversed(batch):
                        portal.queue.appendleft(item)
                    await self._one_by_one(portal, len(batch))
                    continue
                if permanent:
                    item = batch[0]
                    await self.item_dead_letter(item, f"{type(exc).__name__}: {exc}")
                    portal.room = None
                    self._finished(batch)
                    continue
                # Infrastructure trouble (database, broker): put the batch back
                # and retry it later; effects are idempotent.
                log.warning(
                    "portal %s: batch failed (%r); retrying",
                    portal.key,
                    exc,
                    extra=fields(portal.key),
                )
                self.stats.retries += 1
                portal.put_back(batch)
                portal.room = None  # reload state from the database
                await asyncio.sleep(RETRY_DELAY)
                continue
            self._finished(batch)
        if not portal.queue and self.portals.get(portal.key) is portal:
            del self.portals[portal.key]

    async def _one_by_one(self, portal: PortalQueue, count: int) -> None:
        """Run the next ``count`` commands singly: a permanent failure dead-letters one only."""
        for _ in range(count):
            if not portal.queue or self.stopping:
                return
            item = portal.queue.popleft()
            while True:
                try:
                    await self._process(portal, [item])
                except asyncio.CancelledError:
                    portal.queue.appendleft(item)
                    raise
                except Exception as exc:
                    portal.room = None
                    if refused_for_good(exc):
                        await self.item_dead_letter(item, f"{type(exc).__name__}: {exc}")
                        break
                    log.warning(
                        "portal %s: command failed (%r); retrying",
                        portal.key,
                        exc,
                        extra=fields(portal.key),
                    )
                    self.stats.retries += 1
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                break
            self._finished([item])

    def _finished(self, batch: list[WorkItem]) -> None:
        for item in batch:
            if item.tp is None:
                continue
            if not item.reread:
                self.tracker.done(item.tp, item.offset)
                continue
            parked = self.parked.get((item.command.key, item.tp))
            if parked is not None:  # else: revoked meanwhile
                parked.tracker.done(item.tp, item.offset)
                self._drop_parked_if_done(parked)

    async def _process(self, portal: PortalQueue, batch: list[WorkItem]) -> None:
        first = batch[0].command
        if isinstance(first, CreateRoom):
            # Each call holds a slot while on the wire, none while a 429 or an
            # outage is waited out: other rooms keep sending meanwhile.
            with room_slot(self.turns):
                await self.rooms.create(portal, first)
            return
        await self.sender.send_batch(portal, batch)

    # ------------------------------------------------------------ dead letters

    async def _dead_letter(
        self,
        reason: str,
        raw: bytes,
        key: bytes | str | None,
        source: str | None,
        message_id: str | None = None,
    ) -> None:
        await self.dead_letters.report(reason, raw, source=source, key=key, message_id=message_id)
        self.stats.dead_letters += 1

    async def item_dead_letter(self, item: WorkItem, reason: str) -> None:
        message = getattr(item.command, "message", None)  # SendMessage; CreateRoom has none
        mid = message.id if message is not None else None
        await self._dead_letter(reason, item.raw, item.command.key, item.source, mid)

"""The Matrix sink: consume matrix-commands, make the homeserver match, exactly once.

Shape of the work:

* One consumer (group ``catalog.sink_group``), manual commits. A command's
  offset becomes committable only once its effect is durable (event id in the
  map, dead letter acknowledged, RoomCreated acknowledged); a partition's
  commit position never passes an unfinished command (``OffsetTracker``).
* One queue per portal, drained by one worker: a room's commands run strictly
  in order, one request at a time. A semaphore of ``sink.max_rooms_in_flight``
  bounds how many rooms have a homeserver request in flight; it is taken per
  request (not per batch) so rooms progress evenly and none is left alone at
  the end. DB round trips are per batch of up to 100 commands.
* Exactly once per (room, portal, message id, part): skip what is in the map;
  write an intent before sending; send with a deterministic txn id; record the
  event id and drop the intent in one transaction. An intent left by a crash,
  or a send that failed without an answer, is settled by scanning the room's
  newest events for our ``fi.backflow.source`` marker before sending again
  (a repeated txn id is not enough: Synapse forgets txn ids when it restarts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from connectors.matrix.client import MatrixClient, MatrixError, MatrixUnreachable, MediaError
from connectors.matrix.content import SOURCE_KEY, build_content, redaction_content
from connectors.matrix.ghosts import alias_localpart, ghost_localpart
from connectors.matrix.registration import Registration, RegistrationError, load_registration
from connectors.matrix.store import Intent, Mapped, Store, StoreUnreachable
from topics import bus
from topics.codec import RecordError, decode
from topics.records import CreateRoom, NetworkMessage, RoomCreated, SendMessage, portal_key
from topics.settings import Settings

log = logging.getLogger("backflow.sink")

STAGE = "sink"
BATCH = 100  # commands per worker turn
MAX_BUFFERED = 5000  # commands held in memory before the consumer pauses
COMMIT_INTERVAL = 0.5  # seconds between offset commits
SCAN_PAGES = 50  # settling looks at most this many /messages pages back


class SinkError(Exception):
    """A startup problem the operator must fix (one line, no traceback)."""


@dataclass
class SinkStats:
    commands: int = 0
    sent: int = 0
    skipped: int = 0  # already in the map
    settled: int = 0  # in-doubt sends found in the room instead of sent again
    rooms_created: int = 0
    rooms_found: int = 0
    dead_letters: int = 0
    retries: int = 0  # batches retried after infrastructure errors
    rate_limited: int = 0  # 429s the homeserver answered
    transient: int = 0  # 5xx / connection errors retried
    started: float = field(default_factory=time.monotonic)
    first_command: float | None = None  # monotonic time of the first command
    last_sent: float | None = None  # monotonic time of the newest send
    per_room: dict[str, int] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{self.commands} commands: {self.sent} sent ({rate:.1f}/s), {self.skipped} already "
            f"bridged, {self.settled} settled, {self.rooms_created} rooms created, "
            f"{self.rooms_found} found, {self.dead_letters} dead letters, "
            f"{self.rate_limited} rate-limited and {self.transient} failed requests retried"
        )


def txn_id(room_id: str, key: str, message_id: str, part: int) -> str:
    """Deterministic per (room, portal, message, part): a retry reuses it."""
    digest = hashlib.sha256(f"{room_id}\0{key}\0{message_id}\0{part}".encode()).hexdigest()
    return f"bf{digest[:40]}"


# ---------------------------------------------------------------- offsets


class OffsetTracker:
    """Per partition: the offsets in flight; commit only below the first unfinished."""

    def __init__(self) -> None:
        self._order: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # committable position
        self._committed: dict[TopicPartition, int] = {}
        self.pending = 0

    def add(self, tp: TopicPartition, offset: int) -> None:
        self._order.setdefault(tp, deque()).append(offset)
        self._done.setdefault(tp, set())
        self.pending += 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        order = self._order.get(tp)
        if order is None:
            return  # partition revoked meanwhile
        done = self._done[tp]
        done.add(offset)
        self.pending -= 1
        while order and order[0] in done:
            first = order.popleft()
            done.discard(first)
            self._next[tp] = first + 1

    def pending_in(self, tps: set[TopicPartition]) -> int:
        return sum(len(self._order.get(tp, ())) for tp in tps)

    def to_commit(self) -> dict[TopicPartition, int]:
        return {tp: o for tp, o in self._next.items() if self._committed.get(tp) != o}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            order = self._order.pop(tp, None)
            self.pending -= len(order or ())
            self._done.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


# ---------------------------------------------------------------- work items


@dataclass(slots=True)
class Item:
    tp: TopicPartition | None
    offset: int
    raw: bytes
    command: CreateRoom | SendMessage


@dataclass
class RoomState:
    room_id: str
    alias: str
    joined: set[str] | None = None  # None: not loaded yet in this process
    last_event: str | None = None  # newest event we know we put in the room
    settled_startup: bool = False
    recent: dict[str, Mapped] = field(default_factory=dict)  # message id -> first part


class PortalWorker:
    def __init__(self, key: str) -> None:
        self.key = key
        self.queue: deque[Item] = deque()
        self.task: asyncio.Task[None] | None = None
        self.room: RoomState | None = None


# ---------------------------------------------------------------- the sink


class Sink:
    def __init__(
        self,
        settings: Settings,
        registration: Registration,
        client: MatrixClient,
        store: Store,
        producer: AIOKafkaProducer,
        stats: SinkStats,
    ) -> None:
        self.settings = settings
        self.reg = registration
        self.client = client
        self.store = store
        self.producer = producer
        self.stats = stats
        self.server = client.server_name
        self.tracker = OffsetTracker()
        self.workers: dict[str, PortalWorker] = {}
        self.turns = asyncio.Semaphore(max(1, settings.sink.max_rooms_in_flight))
        self.stopping = False
        self._ghosts: dict[str, tuple[str | None, str | None]] = {}
        self._ghost_locks: dict[str, asyncio.Lock] = {}
        self.on_room_progress: Callable[[str, int], None] | None = None

    # ------------------------------------------------------------ dispatch

    async def dispatch(self, msg: ConsumerRecord) -> None:
        tp = TopicPartition(msg.topic, msg.partition)
        self.tracker.add(tp, msg.offset)
        self.stats.commands += 1
        if self.stats.first_command is None:
            self.stats.first_command = time.monotonic()
        raw: bytes = msg.value or b""
        try:
            command = decode(raw)
        except RecordError as exc:
            await self.dead_letter(f"malformed command: {exc}", raw, msg.key, msg)
            self.tracker.done(tp, msg.offset)
            return
        if not isinstance(command, CreateRoom | SendMessage):
            await self.dead_letter(
                f"unexpected record type {command.TYPE!r} on the command topic", raw, msg.key, msg
            )
            self.tracker.done(tp, msg.offset)
            return
        self.enqueue(Item(tp, msg.offset, raw, command))

    def enqueue(self, item: Item) -> None:
        key = item.command.key
        worker = self.workers.get(key)
        if worker is None:
            worker = self.workers[key] = PortalWorker(key)
        worker.queue.append(item)
        if worker.task is None or worker.task.done():
            worker.task = asyncio.create_task(self._run_worker(worker), name=f"sink:{key}")

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for every queued command to finish."""
        tasks = [w.task for w in self.workers.values() if w.task and not w.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _run_worker(self, worker: PortalWorker) -> None:
        while worker.queue and not self.stopping:
            batch = _take_batch(worker.queue)
            try:
                await self._process(worker, batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Infrastructure trouble (database, broker): put the batch back
                # and retry it later; effects are idempotent.
                log.exception("portal %s: batch failed; retrying", worker.key)
                self.stats.retries += 1
                worker.queue.extendleft(reversed(batch))
                worker.room = None  # reload state from the database
                await asyncio.sleep(1.0)
                continue
            for item in batch:
                if item.tp is not None:
                    self.tracker.done(item.tp, item.offset)
        if not worker.queue and self.workers.get(worker.key) is worker:
            del self.workers[worker.key]

    async def _process(self, worker: PortalWorker, batch: list[Item]) -> None:
        first = batch[0].command
        if isinstance(first, CreateRoom):
            async with self.turns:
                await self.create_room(worker, first, batch[0])
            return
        await self.send_batch(worker, batch)

    # ------------------------------------------------------------ dead letters

    async def dead_letter(
        self, reason: str, raw: bytes, key: bytes | str | None, msg: Any = None
    ) -> None:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        source = f"{msg.topic}[{msg.partition}]@{msg.offset}" if msg is not None else None
        letter = bus.dead_letter(STAGE, self.client.scrub(reason), raw, source=source, key=key)
        await bus.send_dead_letter(self.producer, self.settings, letter)
        self.stats.dead_letters += 1
        log.warning("dead letter (%s): %s", key, letter.reason)

    async def _item_dead_letter(self, item: Item, reason: str) -> None:
        source = f"{item.tp.topic}[{item.tp.partition}]@{item.offset}" if item.tp else None
        letter = bus.dead_letter(
            STAGE, self.client.scrub(reason), item.raw, source=source, key=item.command.key
        )
        await bus.send_dead_letter(self.producer, self.settings, letter)
        self.stats.dead_letters += 1
        log.warning("dead letter (%s): %s", item.command.key, letter.reason)

    # ------------------------------------------------------------ ghosts

    def ghost_id(self, network: str, sender_id: str) -> str:
        local = ghost_localpart(self.reg.user_prefix, network, sender_id, self.server)
        return f"@{local}:{self.server}"

    async def ensure_ghost(
        self, network: str, sender_id: str, name: str | None, avatar: str | None
    ) -> str:
        """Register the ghost once and keep its profile up to date; returns its user id."""
        local = ghost_localpart(self.reg.user_prefix, network, sender_id, self.server)
        user_id = f"@{local}:{self.server}"
        cached = self._ghosts.get(user_id)
        if (
            cached is not None
            and (name is None or cached[0] == name)
            and (avatar is None or cached[1] == avatar)
        ):
            return user_id
        lock = self._ghost_locks.setdefault(user_id, asyncio.Lock())
        async with lock:  # two rooms meeting the same new ghost register it once
            cached = self._ghosts.get(user_id)
            if cached is None:
                row = await self.store.ghost(user_id)
                if row is not None:
                    cached = (row["displayname"], row["avatar_source"])
            if cached is None:
                await self.client.register(local)
                cached = (None, None)
            new_name = name if name is not None else cached[0]
            new_avatar = avatar if avatar is not None else cached[1]
            if new_name is not None and new_name != cached[0]:
                await self.client.set_displayname(user_id, new_name)
            if new_avatar is not None and new_avatar != cached[1]:
                try:
                    mxc = await self._media_uri(new_avatar)
                    await self.client.set_avatar(user_id, mxc)
                except (MediaError, MatrixError) as exc:
                    log.warning("avatar for %s not set: %s", user_id, exc)
            if (new_name, new_avatar) != cached or await self.store.ghost(user_id) is None:
                await self.store.save_ghost(user_id, new_name, new_avatar)
            self._ghosts[user_id] = (new_name, new_avatar)
        return user_id

    async def _media_uri(self, url: str) -> str:
        if url.startswith("mxc://"):
            return url
        data, ctype = await self.client.fetch_url(url)
        return await self.client.upload(data, ctype)

    async def ensure_member(self, room: RoomState, user_id: str) -> None:
        """Make sure ``user_id`` is joined before it speaks (invite if needed)."""
        if room.joined is None:
            room.joined = await self.client.joined_members(room.room_id)
        if user_id in room.joined:
            return
        try:
            await self.client.join(room.room_id, user_id)
        except MatrixError as exc:
            if exc.status != 403:
                raise
            try:
                await self.client.invite(room.room_id, user_id)
            except MatrixError as inv:
                if "already" not in inv.error:  # "already in the room" is fine
                    raise
            await self.client.join(room.room_id, user_id)
        room.joined.add(user_id)

    # ------------------------------------------------------------ rooms

    async def room_state(self, worker: PortalWorker, network: str, portal: str) -> RoomState:
        if worker.room is None:
            room_id = await self.store.room(worker.key)
            if room_id is None:
                # A send before its CreateRoom (should not happen): make the room
                # rather than lose the message.
                await self.create_room(worker, CreateRoom(network=network, portal=portal), None)
                assert worker.room is not None
                return worker.room
            alias = alias_localpart(self.reg.alias_prefix, network, portal, self.server)
            worker.room = RoomState(room_id, f"#{alias}:{self.server}")
            worker.room.last_event = await self.store.newest_event(room_id)
        return worker.room

    async def create_room(self, worker: PortalWorker, cmd: CreateRoom, item: Item | None) -> None:
        key = cmd.key
        ghosts = [
            await self.ensure_ghost(cmd.network, m.id, m.name, m.avatar_url) for m in cmd.members
        ]
        local = alias_localpart(self.reg.alias_prefix, cmd.network, cmd.portal, self.server)
        alias = f"#{local}:{self.server}"
        room_id = await self.store.room(key)
        if room_id is None:
            avatar = None
            if cmd.avatar_url:
                try:
                    avatar = await self._media_uri(cmd.avatar_url)
                except (MediaError, MatrixError) as exc:
                    log.warning("room avatar for %s not set: %s", key, exc)
            room_id, created = await self.client.create_room(
                local, name=cmd.name, topic=cmd.topic, invite=ghosts, avatar_mxc=avatar
            )
            await self.store.save_room(key, cmd.network, cmd.portal, room_id, alias)
            if created:
                self.stats.rooms_created += 1
                log.info("portal %s: created room %s (%s)", key, room_id, alias)
            else:
                self.stats.rooms_found += 1
                log.info("portal %s: found existing room %s (%s)", key, room_id, alias)
        else:
            self.stats.rooms_found += 1
        room = worker.room
        if room is None or room.room_id != room_id:
            room = worker.room = RoomState(room_id, alias)
            room.last_event = await self.store.newest_event(room_id)
        # Members join now, before any of them speaks (joins take no ts).
        for ghost in ghosts:
            await self.ensure_member(room, ghost)
        await self.settle_startup(worker.key, room)
        last_ts = await self.store.last_bridged_ts(room_id, key)
        event = RoomCreated(
            network=cmd.network,
            portal=cmd.portal,
            room_id=room_id,
            alias=alias,
            last_bridged_ts=last_ts,
        )
        future = await bus.send(self.producer, self.settings.catalog.portal_events, event)
        await future

    # ------------------------------------------------------------ settling

    async def scan(
        self, room: RoomState, key: str, stop_event: str | None
    ) -> dict[tuple[str, int], tuple[str, int, str]]:
        """Our events newer than ``stop_event``: (message id, part) -> (event id, ts, sender).

        Sends in a room are sequential, so anything in doubt is newer than the
        newest event we recorded (or know we sent); scanning back to it is enough.
        """
        found: dict[tuple[str, int], tuple[str, int, str]] = {}
        seen: dict[str, tuple[int, str]] = {}  # event id -> (ts, sender), redacted ones too
        redactions: list[tuple[str, str]] = []  # (target message id, redacted event id)
        token: str | None = None
        for _ in range(SCAN_PAGES):
            page = await self.client.messages(room.room_id, direction="b", start=token, limit=100)
            chunk = page.get("chunk") or []
            done = not chunk or not page.get("end")
            for ev in chunk:
                if (stop_event is not None and ev.get("event_id") == stop_event) or ev.get(
                    "type"
                ) == "m.room.create":
                    done = True
                    break
                seen[ev["event_id"]] = (ev["origin_server_ts"], ev["sender"])
                content = ev.get("content") or {}
                src = content.get(SOURCE_KEY)
                if not isinstance(src, dict):
                    continue
                if portal_key(str(src.get("network")), str(src.get("portal"))) != key:
                    continue
                item = (str(src.get("id")), int(src.get("part") or 0))
                found.setdefault(item, (ev["event_id"], ev["origin_server_ts"], ev["sender"]))
                # A redacted target has lost its marker; its redaction names it.
                if ev.get("type") == "m.room.redaction" and src.get("target"):
                    redacts = content.get("redacts") or ev.get("redacts")
                    if redacts:
                        redactions.append((str(src["target"]), redacts))
            if done:
                break
            token = page.get("end")
        for target, event_id in redactions:
            if event_id in seen:  # only targets inside the scanned (in-doubt) range
                ts, sender = seen[event_id]
                found.setdefault((target, 0), (event_id, ts, sender))
        return found

    async def settle_startup(self, key: str, room: RoomState) -> None:
        """Settle intents left by a previous run for this room (once per process)."""
        if room.settled_startup:
            return
        intents = [i for i in await self.store.intents(room.room_id) if i.portal_key == key]
        room.settled_startup = True
        if not intents:
            return
        found = await self.scan(room, key, await self.store.newest_event(room.room_id))
        results = []
        for intent in intents:
            hit = found.get((intent.message_id, intent.part))
            if hit is not None:
                results.append((intent, hit[0], hit[1], hit[2]))
        if results:
            # Order by ts so the newest recorded event is the newest in the room.
            results.sort(key=lambda r: r[2])
            await self.store.record(results)
            self.stats.settled += len(results)
            room.last_event = await self.store.newest_event(room.room_id)
            log.info("portal %s: settled %d in-doubt sends from a previous run", key, len(results))

    # ------------------------------------------------------------ messages

    async def send_batch(self, worker: PortalWorker, batch: list[Item]) -> None:
        m0 = batch[0].command.message  # type: ignore[union-attr]
        room = await self.room_state(worker, m0.network, m0.portal)
        await self.settle_startup(worker.key, room)
        key = worker.key
        keys = [(i.command.message.id, i.command.message.part) for i in batch]  # type: ignore[union-attr]
        mapped = await self.store.lookup(room.room_id, key, keys)
        todo: list[tuple[Item, Intent]] = []
        seen: set[tuple[str, int]] = set()
        for item, k in zip(batch, keys, strict=True):
            if k in mapped or k in seen:
                self.stats.skipped += 1
                continue
            seen.add(k)
            todo.append(
                (item, Intent(room.room_id, key, k[0], k[1], txn_id(room.room_id, key, *k)))
            )
        if not todo:
            return
        await self.store.add_intents([i for _, i in todo])
        results: list[tuple[Intent, str, int, str | None]] = []
        failed: list[Intent] = []
        try:
            for item, intent in todo:
                msg = item.command.message  # type: ignore[union-attr]
                try:
                    event_id, sender = await self.send_one(room, key, msg, intent)
                except (MatrixError, MediaError, _Unresolvable) as exc:
                    await self._item_dead_letter(item, _reason(exc))
                    failed.append(intent)
                    continue
                results.append((intent, event_id, msg.ts, sender))
                room.last_event = event_id
                if msg.part == 0 or msg.id not in room.recent:
                    room.recent[msg.id] = Mapped(event_id, msg.ts, sender)
        finally:
            # Whatever happened, make what did happen durable.
            await self.store.record(results)
            await self.store.drop_intents(failed)
            self.stats.sent += len(results)
            self.stats.last_sent = time.monotonic()
        if len(room.recent) > 10_000:
            room.recent.clear()
        self.stats.per_room[key] = self.stats.per_room.get(key, 0) + len(results)
        if self.on_room_progress is not None:
            self.on_room_progress(key, self.stats.per_room[key])

    async def resolve(self, room: RoomState, key: str, message_id: str) -> Mapped | None:
        hit = room.recent.get(message_id)
        if hit is None:
            hit = await self.store.lookup_message(room.room_id, key, message_id)
        return hit

    async def send_one(
        self, room: RoomState, key: str, msg: NetworkMessage, intent: Intent
    ) -> tuple[str, str]:
        c = msg.content
        ghost = await self.ensure_ghost(
            msg.network, msg.sender.id, msg.sender.name, msg.sender.avatar_url
        )
        await self.ensure_member(room, ghost)
        stop = room.last_event

        async def settle() -> dict[str, Any] | None:
            # The send failed without an answer: did it land anyway?
            found = await self.scan(room, key, stop)
            hit = found.get((msg.id, msg.part))
            if hit is None:
                return None
            self.stats.settled += 1
            log.info("portal %s: in-doubt send of %s found in the room", key, msg.id)
            return {"event_id": hit[0]}

        target: Mapped | None = None
        if c.kind in ("edit", "reaction", "redaction"):
            assert c.target is not None
            target = await self.resolve(room, key, c.target)
            if target is None:
                raise _Unresolvable(
                    f"{c.kind} target {c.target!r} is not bridged in {room.room_id}"
                )
        if c.kind == "redaction":
            assert target is not None
            as_user = ghost if target.sender == ghost else self.client.bot
            async with self.turns:
                event_id = await self.client.redact(
                    room.room_id,
                    target.event_id,
                    intent.txn_id,
                    redaction_content(msg),
                    as_user=as_user,
                    settle=settle,
                )
            return event_id, as_user
        reply = thread = None
        if msg.reply_to:
            hit = await self.resolve(room, key, msg.reply_to)
            reply = hit.event_id if hit else None  # unknown target: send without the relation
        if msg.thread:
            hit = await self.resolve(room, key, msg.thread)
            thread = hit.event_id if hit else None
        mxc = size = None
        if c.kind == "media":
            async with self.turns:
                mxc, size = await self.upload_media(msg)
        event_type, content = build_content(
            msg,
            mxc=mxc,
            media_size=size,
            reply_event=reply,
            thread_root=thread,
            target_event=target.event_id if target else None,
        )
        async with self.turns:
            event_id = await self.client.send(
                room.room_id,
                event_type,
                content,
                intent.txn_id,
                as_user=ghost,
                ts=msg.ts,
                settle=settle,
            )
        return event_id, ghost

    async def upload_media(self, msg: NetworkMessage) -> tuple[str, int]:
        c = msg.content
        if c.data is not None:
            try:
                data = base64.b64decode(c.data, validate=True)
            except (binascii.Error, ValueError):
                raise MediaError("media 'data' is not valid base64") from None
            ctype = c.mimetype or "application/octet-stream"
        else:
            assert c.url is not None
            if c.url.startswith("mxc://"):
                return c.url, c.size or 0
            data, fetched = await self.client.fetch_url(c.url)
            ctype = c.mimetype or fetched
        return await self.client.upload(data, ctype, c.filename), len(data)


class _Unresolvable(Exception):
    pass


def _reason(exc: Exception) -> str:
    if isinstance(exc, MatrixError):
        return f"homeserver refused: {exc.errcode}: {exc.error} (HTTP {exc.status})"
    return str(exc)


def _take_batch(queue: deque[Item]) -> list[Item]:
    """A CreateRoom alone, or up to BATCH consecutive sends."""
    first = queue.popleft()
    batch = [first]
    if isinstance(first.command, CreateRoom):
        return batch
    while queue and len(batch) < BATCH and isinstance(queue[0].command, SendMessage):
        batch.append(queue.popleft())
    return batch


# ---------------------------------------------------------------- running


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, sink: Sink, consumer: AIOKafkaConsumer) -> None:
        self.sink = sink
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Finish what we started for these partitions and commit it, so the next
        # owner starts after it (anything unfinished is settled by the next owner).
        deadline = time.monotonic() + 20
        while self.sink.tracker.pending_in(set(revoked)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await _commit(self.consumer, self.sink.tracker)
        self.sink.tracker.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


async def _commit(consumer: AIOKafkaConsumer, tracker: OffsetTracker) -> None:
    offsets = tracker.to_commit()
    if not offsets:
        return
    assigned = consumer.assignment()
    offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
        tracker.committed(offsets)
    except Exception as exc:  # rebalancing: the next commit catches up
        log.warning("offset commit failed (%s); will retry", exc)


async def open_client(settings: Settings, registration: Registration) -> MatrixClient:
    """A client for the configured homeserver, checked to answer and accept our token."""
    if not settings.homeserver.url or not settings.homeserver.server_name:
        raise SinkError(
            "no homeserver configured: set homeserver.url and homeserver.server_name "
            "(BACKFLOW_HOMESERVER_URL, BACKFLOW_HOMESERVER_SERVER_NAME)"
        )
    client = MatrixClient(
        settings.homeserver.url,
        registration.as_token,
        settings.homeserver.server_name,
        registration.sender_localpart,
        max_retry_delay=settings.sink.max_retry_delay_s,
    )
    try:
        await client.versions()
    except MatrixUnreachable as exc:
        await client.close()
        raise SinkError(
            f"cannot reach the homeserver at {settings.homeserver.url}: {exc}"
        ) from None
    except MatrixError as exc:
        await client.close()
        raise SinkError(
            f"the homeserver at {settings.homeserver.url} refused the appservice token: "
            f"{exc.errcode}: {exc.error}"
        ) from None
    return client


async def run_sink(
    settings: Settings,
    stop: asyncio.Event | None = None,
    idle_exit: float | None = None,
    on_progress: Callable[[SinkStats], None] | None = None,
) -> SinkStats:
    """Consume the command topic until ``stop`` is set (or idle for ``idle_exit`` s).

    Raises SinkError (one clear line) when the registration, homeserver,
    database or broker is unusable at startup.
    """
    stop = stop or asyncio.Event()
    stats = SinkStats()
    try:
        registration = load_registration(settings.appservice.registration)
    except RegistrationError as exc:
        raise SinkError(str(exc)) from None
    client = await open_client(settings, registration)
    store: Store | None = None
    producer: AIOKafkaProducer | None = None
    consumer: AIOKafkaConsumer | None = None
    try:
        try:
            store = await Store.open(
                settings.database.url, size=settings.sink.max_rooms_in_flight + 4
            )
        except StoreUnreachable as exc:
            raise SinkError(str(exc)) from None
        try:
            producer = bus.producer(settings)
            await bus.start(producer, settings)
            consumer = bus.consumer(settings, group=settings.catalog.sink_group)
        except bus.BusError as exc:
            raise SinkError(str(exc)) from None
        sink = Sink(settings, registration, client, store, producer, stats)
        consumer.subscribe([settings.catalog.matrix_commands], listener=_Rebalance(sink, consumer))
        try:
            await bus.start(consumer, settings)
        except bus.BusError as exc:
            raise SinkError(str(exc)) from None
        await _loop(sink, consumer, stop, idle_exit, on_progress)
        return stats
    finally:
        stats.rate_limited = client.stats["rate_limited"]
        stats.transient = client.stats["transient"]
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        if store is not None:
            await store.close()
        await client.close()


async def _loop(
    sink: Sink,
    consumer: AIOKafkaConsumer,
    stop: asyncio.Event,
    idle_exit: float | None,
    on_progress: Callable[[SinkStats], None] | None,
) -> None:
    last_commit = time.monotonic()
    last_activity: float | None = None
    paused = False
    try:
        while not stop.is_set():
            # Backpressure: stop fetching (but keep polling, so we stay in the
            # group) while too many commands wait in memory.
            if sink.tracker.pending > MAX_BUFFERED and not paused:
                consumer.pause(*consumer.assignment())
                paused = True
            elif paused and sink.tracker.pending < MAX_BUFFERED // 2:
                consumer.resume(*consumer.assignment())
                paused = False
            batches = await consumer.getmany(timeout_ms=100, max_records=1000)
            now = time.monotonic()
            got = False
            for records in batches.values():
                for msg in records:
                    got = True
                    await sink.dispatch(msg)
            if got or sink.tracker.pending:
                last_activity = now
            elif last_activity is None and consumer.assignment():
                last_activity = now  # idle clock starts once we own partitions
            if now - last_commit >= COMMIT_INTERVAL:
                await _commit(consumer, sink.tracker)
                last_commit = now
                sink.stats.rate_limited = sink.client.stats["rate_limited"]
                sink.stats.transient = sink.client.stats["transient"]
                if on_progress is not None:
                    on_progress(sink.stats)
            if (
                idle_exit is not None
                and last_activity is not None
                and not sink.tracker.pending
                and now - last_activity >= idle_exit
            ):
                break
    finally:
        # Let workers finish their current batch, then commit what is durable.
        sink.stopping = True
        await sink.drain(timeout=30)
        for worker in list(sink.workers.values()):
            if worker.task is not None and not worker.task.done():
                worker.task.cancel()
        await _commit(consumer, sink.tracker)
        if on_progress is not None:
            on_progress(sink.stats)

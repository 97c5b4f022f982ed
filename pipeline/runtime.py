"""A pipeline worker's runtime: what the faust agent (pipeline/app.py) calls per batch.

The agent consumes the three co-partitioned topics (all keyed by portal), so
one worker owns a portal at a time and sees its records in partition order.
``Runtime`` holds the worker's resources (database pool, producer, a reader
of the command log), applies decoded batches (``pipeline.intake``) to the
hold store (``pipeline.hold``), and produces the outbox (``pipeline.outbox``)
in per-portal ``seq`` order after reconciling each owned partition with the
log. See docs/pipeline.md for the exactly-once argument.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.hold import HoldStore, Outcome
from pipeline.intake import Incoming, Prepared, prepare
from pipeline.outbox import Outbox, OutboxPortal
from pipeline.schema import init_schema
from topics import bus
from topics.codec import send_command
from topics.deadletter import DeadLetters, Stage
from topics.logs import fields
from topics.records import DeadLetter
from topics.retry import RetryPolicy, retry
from topics.settings import Settings

log = logging.getLogger("backflow.pipeline")

TRACE = bool(os.environ.get("BACKFLOW_PIPELINE_TRACE"))  # log each batch's timings
# The one retry policy (topics/retry.py: what is transient is decided there),
# without a time limit: a record the pipeline gave up on would have to be
# dropped or dead-lettered for an outage, and it must be neither.
RETRY = RetryPolicy(first_delay=0.2, max_delay=10.0, give_up_after=math.inf)


class Runtime:
    """Per-worker resources: the database pool, a producer, a log reader, the outbox."""

    def __init__(
        self, settings: Settings, *, flush_chunk: int = 5000, flush_pause: float = 0.0
    ) -> None:
        self.settings = settings
        self.catalog = settings.catalog
        self.flush_chunk = flush_chunk
        self.flush_pause = flush_pause  # tests: seconds between outbox pages
        self.kinds = {
            self.catalog.history: "history",
            self.catalog.live: "live",
            self.catalog.portal_events: "events",
        }
        self.pool: asyncpg.Pool | None = None
        self.hold: HoldStore | None = None
        self.outbox: Outbox | None = None
        self.producer: Any = None
        self.reader: AIOKafkaConsumer | None = None
        self.dead_letters: DeadLetters = DeadLetters(None, "", Stage.PIPELINE)  # set by start
        self._start_lock = asyncio.Lock()
        # Outbox partitions this worker may produce: assigned AND reconciled
        # with the log. Everything that produces holds ``flush_lock``.
        self.ready: set[int] = set()
        self.dirty: set[int] = set()  # a produce failed: re-read the log first
        self.flush_lock = asyncio.Lock()
        self.stats = {"applied": 0, "produced": 0, "dead_letters": 0}
        self.stopped = False
        self._flush_wanted = asyncio.Event()
        self._flusher: asyncio.Future | None = None

    async def start(self) -> tuple[HoldStore, Outbox]:
        """Open the pool, producer and log reader once; the hold store and outbox."""
        async with self._start_lock:
            if self.stopped:
                raise RuntimeError("pipeline runtime is stopped")
            if self.hold is not None and self.outbox is not None:
                return self.hold, self.outbox
            url = self.settings.database.url
            if not url:
                raise RuntimeError("no database configured: set BACKFLOW_DATABASE_URL")
            pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
            await init_schema(pool)
            producer = bus.producer(self.settings, linger_ms=2)
            await bus.start(producer, self.settings)
            reader = AIOKafkaConsumer(
                bootstrap_servers=bus.bootstrap(self.settings),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await bus.start(reader, self.settings)
            self.pool, self.producer, self.reader = pool, producer, reader
            self.dead_letters = DeadLetters(producer, self.catalog.dead_letters, Stage.PIPELINE)
            self.hold = HoldStore(pool, self.settings.backfill)
            self.outbox = Outbox(pool)
            return self.hold, self.outbox

    async def stop(self) -> None:
        self.stopped = True
        if self._flusher is not None:
            self._flusher.cancel()
        async with self.flush_lock:
            self.ready.clear()
            if self.producer is not None:
                await self.producer.stop()
            if self.reader is not None:
                await self.reader.stop()
            if self.pool is not None:
                await self.pool.close()
            self.hold = self.outbox = self.producer = self.reader = self.pool = None

    # ------------------------------------------------------------ rebalance

    async def on_assigned(self, partitions: set[int]) -> None:
        """Reconcile newly owned outbox partitions with the log, then produce."""
        await self.start()
        log.info("pipeline owns partitions %s", sorted(partitions))
        async with self.flush_lock:
            self.ready &= partitions
            for p in sorted(partitions - self.ready):
                await self._retry(lambda p=p: self._scan(p), f"reading back partition {p}")
                self.ready.add(p)
        self.wake_flusher()

    async def on_revoked(self, partitions: set[int]) -> None:
        # Taking the lock waits for an in-flight flush: the next owner only
        # reads the log after we stopped producing into these partitions.
        async with self.flush_lock:
            self.ready -= partitions

    async def _scan(self, partition: int) -> None:
        """Mark every command already in the log as produced (the log is the truth).

        Covers a crash between the producer's ack and the produced mark: those
        commands are found here and never produced twice.
        """
        assert self.reader is not None and self.outbox is not None
        tp = TopicPartition(self.catalog.matrix_commands, partition)
        start = (await self.outbox.command_offsets([partition])).get(partition, 0)
        end = (await self.reader.end_offsets([tp]))[tp]
        if start >= end:
            return
        self.reader.assign([tp])
        self.reader.seek(tp, start)
        rooms: list[str] = []
        sends: dict[str, list[int]] = {}
        found = 0
        position = start
        while position < end:
            batch = await self.reader.getmany(tp, timeout_ms=1000, max_records=5000)
            for rec in batch.get(tp, ()):
                position = rec.offset + 1
                try:
                    own = read_back(orjson.loads(rec.value))
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable command at %s@%s", tp, rec.offset)
                    continue
                if own is None:
                    continue
                key, seq = own
                if seq is None:
                    rooms.append(key)
                else:
                    sends.setdefault(key, []).append(seq)
                    found += 1
            if found >= 20_000:
                await self.outbox.mark_produced(rooms, sends, {partition: position})
                rooms, sends, found = [], {}, 0
        await self.outbox.mark_produced(rooms, sends, {partition: end})
        log.info("partition %s: read back commands %s..%s", partition, start, end)

    # ------------------------------------------------------------ outbox

    async def flush(self, partitions: Iterable[int] | None = None) -> int:
        """Produce pending commands of owned partitions in (portal, seq) order."""
        _, store = await self.start()
        async with self.flush_lock:
            wanted = self.ready if partitions is None else self.ready & set(partitions)
            parts = sorted(wanted)
            if not parts:
                return 0
            produced = 0
            try:
                for p in sorted(self.dirty & set(parts)):
                    await self._scan(p)
                    self.dirty.discard(p)
                rooms = await store.pending_rooms(parts)
                if rooms:
                    futures = [
                        await self.producer.send(
                            self.catalog.matrix_commands,
                            value,
                            key=key.encode(),
                            partition=partition,
                        )
                        for key, partition, value in rooms
                    ]
                    metas = await asyncio.gather(*futures)
                    await store.mark_produced([k for k, _, _ in rooms], {}, _next_offsets(metas))
                    produced += len(rooms)
                # Portals in key order, in pages of about flush_chunk commands;
                # each page is marked produced after the broker acked it. The
                # next page is read and queued while one waits for its acks
                # (at most two in flight): a failed page with a later one in
                # the log is a gap, which the read-back handles.
                while portals := await store.outbox_portals(parts):
                    progressed = False
                    in_flight: deque[tuple[dict[str, list[int]], asyncio.Future]] = deque()
                    try:
                        for group in _pages(portals, self.flush_chunk):
                            page = await store.outbox_page(group, self.flush_chunk)
                            if not page:
                                continue
                            acked = await self._submit(
                                (portal.partition, portal.key.encode(), send_command(record, seq))
                                for portal, seq, record in page
                            )
                            sends: dict[str, list[int]] = {}
                            for portal, seq, _ in page:
                                sends.setdefault(portal.key, []).append(seq)
                            in_flight.append((sends, acked))
                            produced += len(page)
                            progressed = True
                            if self.flush_pause:
                                await asyncio.sleep(self.flush_pause)
                            if len(in_flight) > 1:
                                done, acks = in_flight.popleft()
                                await store.mark_produced([], done, await acks)
                        while in_flight:
                            done, acks = in_flight.popleft()
                            await store.mark_produced([], done, await acks)
                    finally:
                        for _, acks in in_flight:  # after a failure: the read-back settles them
                            acks.add_done_callback(_ignore_result)
                    if not progressed:
                        break
                await store.settle_backfilling(parts)
            except Exception as exc:  # noqa: BLE001 - retried by the next flush
                # Some records of the failed round may be in the log: read it
                # back before producing these partitions again.
                self.dirty |= set(parts)
                log.warning("outbox flush failed, will retry: %r", exc)
            self.stats["produced"] += produced
            return produced

    async def _submit(self, commands: Iterable[tuple[int, bytes, bytes]]) -> asyncio.Future:
        """Queue ``(partition, key, value)`` commands in order; a future of the next offsets.

        The returned future resolves, once the broker acked them all, to the
        next offset per partition (what ``mark_produced`` records).

        Fills one aiokafka batch per partition and submits it when full
        (``send_batch``), instead of a ``send`` with its own future per
        command. Batches of a partition are queued in submission order and
        the producer is idempotent, so each partition's order is kept.
        """
        topic = self.catalog.matrix_commands
        producer = self.producer
        builders: dict[int, Any] = {}
        counts: dict[int, int] = {}
        pending: list[tuple[Any, int]] = []  # (future, records in its batch; 0: single send)
        for partition, key, value in commands:
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
                counts[partition] = 0
            if builder.append(key=key, value=value, timestamp=None) is not None:
                counts[partition] += 1
                continue
            if counts[partition]:  # full: submit it and start the next one
                pending.append(
                    (
                        await producer.send_batch(builder, topic, partition=partition),
                        counts[partition],
                    )
                )
                builder = builders[partition] = producer.create_batch()
                counts[partition] = 0
                if builder.append(key=key, value=value, timestamp=None) is not None:
                    counts[partition] += 1
                    continue
            # Bigger than a batch on its own: after what is queued, by itself.
            del builders[partition]
            pending.append((await producer.send(topic, value, key=key, partition=partition), 0))
        for partition, builder in builders.items():
            if counts[partition]:
                pending.append(
                    (
                        await producer.send_batch(builder, topic, partition=partition),
                        counts[partition],
                    )
                )
        return asyncio.ensure_future(_next_offsets_of(pending))

    # ------------------------------------------------------------ records

    def prepare(self, records: Sequence[Any]) -> Prepared:
        """Decode and validate a batch (CPU only: may run while the previous batch applies)."""
        return prepare(records, self.kinds)

    async def apply(self, prepared: Prepared) -> None:
        """Dead-letter, apply to Postgres, decide syncs, wake the outbox flush."""
        store, _ = await self.start()
        t0 = time.perf_counter()
        if prepared.letters:
            await self._dead_letters(prepared.letters)
        if prepared.items:
            outcome = await self._apply(store, prepared.items)
            for network, sync in sorted(outcome.syncs):
                await self._retry(
                    lambda n=network, s=sync: store.decide_sync(n, s), f"deciding sync {sync}"
                )
            self.stats["applied"] += len(prepared.items)
            self.wake_flusher()
            if TRACE:
                ms = (time.perf_counter() - t0) * 1000
                log.info("batch of %d: applied in %.1f ms", prepared.size, ms)

    def wake_flusher(self) -> None:
        """Produce the outbox in the background, overlapping the next batch's apply.

        The outbox is durable, so the batch can be acked before its commands
        are produced; the flush lock keeps the (portal, seq) order.
        """
        self._flush_wanted.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    async def _flush_loop(self) -> None:
        while not self.stopped:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            t0 = time.perf_counter()
            produced = await self.flush()
            if TRACE and produced:
                log.info("flushed %d in %.1f ms", produced, (time.perf_counter() - t0) * 1000)

    async def _apply(self, store: HoldStore, items: list[Incoming]) -> Outcome:
        try:
            return await self._retry(lambda: store.apply(items), "applying a batch")
        except Exception as exc:  # noqa: BLE001 - isolate the record that fails
            log.warning("batch failed (%r); applying record by record", exc)
        outcome = Outcome()
        for item in items:
            try:
                one = await self._retry(lambda item=item: store.apply_one(item), "applying")
            except Exception as exc:  # noqa: BLE001 - this record is the bad one
                await self._reject(store, item, f"processing failed: {exc!r}")
                continue
            outcome.syncs |= one.syncs
        return outcome

    async def _reject(self, store: HoldStore, item: Incoming, reason: str) -> None:
        """Dead-letter a record that failed on its own and note it on its portal.

        Never raises (but for cancellation): a failure here would crash the
        agent and stall every later record of its partitions, for other
        portals too. The dead letter is retried while the broker is away.
        """
        key = getattr(item.record, "key", None)
        where = fields(key, getattr(item.record, "id", None))  # a message's id
        log.warning("record %s (portal %r) failed: %s", item.source, key, reason, extra=where)
        try:
            letter = self.dead_letters.build(reason, item.raw, source=item.source, key=key)
            await self._retry(lambda: self._dead_letters([letter]), "dead-lettering")
        except Exception:  # noqa: BLE001 - must not stop the agent
            log.exception("could not dead-letter %s", item.source)
        try:
            await self._retry(lambda: store.record_error(key, reason), "recording the error")
        except Exception:  # noqa: BLE001 - only bookkeeping for `backflow status`
            log.exception("could not record the error of portal %r", key, extra=where)

    async def _dead_letters(self, letters: list[DeadLetter]) -> None:
        """Publish dead letters (the reporter logs each) and wait for the acks."""
        await self.dead_letters.report_all(letters)
        self.stats["dead_letters"] += len(letters)

    async def _retry(self, make: Any, what: str) -> Any:
        """Retry transient failures until they pass (at-least-once: never skip a record)."""
        return await retry(make, what, RETRY)


def read_back(cmd: dict[str, Any]) -> tuple[str, int | None] | None:
    """A command found in the log, if it is one the pipeline produces: (portal key, seq).

    seq None: the portal's create_room. Commands `backflow replay` publishes
    are not the pipeline's (None): sends with seq 0, outside its numbering
    1, 2, 3 ..., and create_room for a rebuild. Taking one for the pipeline's
    own would mark a command produced that never was.
    """
    if cmd["type"] == "create_room":
        if cmd.get("rebuild") is not None or cmd.get("finish_rebuild") is not None:
            return None
        return f"{cmd['network']}:{cmd['portal']}", None
    if cmd["type"] == "send":
        seq = int(cmd["seq"])
        if seq <= 0:
            return None
        m = cmd["message"]
        return f"{m['network']}:{m['portal']}", seq
    return None


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


async def _next_offsets_of(pending: list[tuple[Any, int]]) -> dict[int, int]:
    metas = await asyncio.gather(*(future for future, _ in pending))
    offsets: dict[int, int] = {}
    for meta, (_, count) in zip(metas, pending, strict=True):
        # A batch's metadata carries its base offset; a single send its own.
        end = meta.offset + (count or 1)
        offsets[meta.partition] = max(offsets.get(meta.partition, 0), end)
    return offsets


def _pages(portals: Sequence[OutboxPortal], size: int) -> Iterable[list[OutboxPortal]]:
    """Consecutive groups of portals with about ``size`` pending commands each."""
    group: list[OutboxPortal] = []
    pending = 0
    for portal in portals:
        group.append(portal)
        pending += portal.pending
        if pending >= size:
            yield group
            group, pending = [], 0
    if group:
        yield group


def _next_offsets(metas: Iterable[Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for meta in metas:
        out[meta.partition] = max(out.get(meta.partition, 0), meta.offset + 1)
    return out

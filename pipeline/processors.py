"""The portal processors: faust agents over history, live and portal events.

One agent consumes the three co-partitioned topics (all keyed by portal), so
one worker owns a portal at a time and sees its records in partition order.
Records are applied to Postgres in batches (``pipeline.state``); commands are
written to an outbox there and produced by ``Runtime.flush`` in per-portal
``seq`` order. See docs/pipeline.md for the exactly-once argument.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as KafkaErrors

from backflow import bus
from backflow.settings import Settings
from pipeline.state import Incoming, Outcome, Store, init_schema, send_command
from topics.codec import RecordError, decode

log = logging.getLogger("backflow.pipeline")

STAGE = "pipeline"
TRACE = bool(os.environ.get("BACKFLOW_PIPELINE_TRACE"))  # log each batch's timings
# Which record types belong on which source topic (topics.catalog specs).
ALLOWED = {
    "history": ("message", "portal", "history_complete", "sync_complete"),
    "live": ("message", "portal"),
    "events": ("room_created",),
}
# Errors after which retrying the same work is right (the database or the
# network was away, or Postgres chose us as a deadlock victim).
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


class Runtime:
    """Per-worker resources: the database pool, a producer, a log reader, the outbox."""

    def __init__(self, settings: Settings, *, flush_chunk: int = 5000) -> None:
        self.settings = settings
        self.catalog = settings.catalog
        self.flush_chunk = flush_chunk
        self.kinds = {
            self.catalog.history: "history",
            self.catalog.live: "live",
            self.catalog.portal_events: "events",
        }
        self.pool: asyncpg.Pool | None = None
        self.store: Store | None = None
        self.producer: Any = None
        self.reader: AIOKafkaConsumer | None = None
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

    async def start(self) -> Store:
        async with self._start_lock:
            if self.stopped:
                raise RuntimeError("pipeline runtime is stopped")
            if self.store is not None:
                return self.store
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
            self.store = Store(pool, self.settings.backfill)
            return self.store

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
            self.store = self.producer = self.reader = self.pool = None

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
        assert self.reader is not None and self.store is not None
        tp = TopicPartition(self.catalog.matrix_commands, partition)
        start = (await self.store.command_offsets([partition])).get(partition, 0)
        end = (await self.reader.end_offsets([tp]))[tp]
        if start >= end:
            return
        self.reader.assign([tp])
        self.reader.seek(tp, start)
        rooms: list[str] = []
        sends: list[tuple[str, int]] = []
        position = start
        while position < end:
            batch = await self.reader.getmany(tp, timeout_ms=1000, max_records=5000)
            for rec in batch.get(tp, ()):
                position = rec.offset + 1
                try:
                    cmd = orjson.loads(rec.value)
                    if cmd["type"] == "create_room":
                        rooms.append(f"{cmd['network']}:{cmd['portal']}")
                    elif cmd["type"] == "send":
                        m = cmd["message"]
                        sends.append((f"{m['network']}:{m['portal']}", int(cmd["seq"])))
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable command at %s@%s", tp, rec.offset)
            if len(sends) >= 20_000:
                await self.store.mark_produced(rooms, sends, {partition: position})
                rooms, sends = [], []
        await self.store.mark_produced(rooms, sends, {partition: end})
        log.info("partition %s: read back commands %s..%s", partition, start, end)

    # ------------------------------------------------------------ outbox

    async def flush(self, partitions: Iterable[int] | None = None) -> int:
        """Produce pending commands of owned partitions in (portal, seq) order."""
        store = await self.start()
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
                    await store.mark_produced([k for k, _, _ in rooms], [], _next_offsets(metas))
                    produced += len(rooms)
                after: tuple[str, int] = ("", -1)
                while True:
                    page = await store.pending_sends(parts, after, self.flush_chunk)
                    if not page:
                        break
                    # The cursor passes other workers' rows; only ours are produced.
                    after = (page[-1]["portal_key"], page[-1]["seq"])
                    rows = [r for r in page if r["owned"]]
                    if not rows:
                        continue
                    offsets = await self._produce_in_batches(
                        (
                            r["partition"],
                            r["portal_key"].encode(),
                            send_command(r["record"], r["seq"]),
                        )
                        for r in rows
                    )
                    await store.mark_produced(
                        [], [(r["portal_key"], r["seq"]) for r in rows], offsets
                    )
                    produced += len(rows)
                await store.settle_backfilling(parts)
            except Exception as exc:  # noqa: BLE001 - retried by the next flush
                # Some records of the failed round may be in the log: read it
                # back before producing these partitions again.
                self.dirty |= set(parts)
                log.warning("outbox flush failed, will retry: %r", exc)
            self.stats["produced"] += produced
            return produced

    async def _produce_in_batches(
        self, commands: Iterable[tuple[int, bytes, bytes]]
    ) -> dict[int, int]:
        """Produce ``(partition, key, value)`` commands in order; the next offset per partition.

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
        metas = await asyncio.gather(*(future for future, _ in pending))
        offsets: dict[int, int] = {}
        for meta, (_, count) in zip(metas, pending, strict=True):
            # A batch's metadata carries its base offset; a single send its own.
            end = meta.offset + (count or 1)
            offsets[meta.partition] = max(offsets.get(meta.partition, 0), end)
        return offsets

    # ------------------------------------------------------------ records

    async def handle(self, events: Sequence[faust.types.EventT]) -> None:
        """Decode, dead-letter the bad ones, apply the rest, decide, produce."""
        store = await self.start()
        t0 = time.perf_counter()
        items: list[Incoming] = []
        letters = []
        for event in events:
            msg = event.message
            raw = event.value if isinstance(event.value, bytes) else b""
            kind = self.kinds.get(msg.topic, "history")
            try:
                record = decode(raw)
                if record.TYPE not in ALLOWED[kind]:
                    raise RecordError("type", f"a {record.TYPE!r} record does not belong here")
            except RecordError as exc:
                source = f"{msg.topic}[{msg.partition}]@{msg.offset}"
                key = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else None
                letters.append(bus.dead_letter(STAGE, str(exc), raw, source=source, key=key))
                continue
            items.append(Incoming(record, kind, msg.partition, msg.offset, raw))
        if letters:
            await self._dead_letters(letters)
        if items:
            outcome = await self._apply(store, items)
            for network, sync in sorted(outcome.syncs):
                await self._retry(
                    lambda n=network, s=sync: store.decide_sync(n, s), f"deciding sync {sync}"
                )
            self.stats["applied"] += len(items)
            self.wake_flusher()
            if TRACE:
                log.info("batch of %d: %.1f ms", len(events), (time.perf_counter() - t0) * 1000)

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

    async def _apply(self, store: Store, items: list[Incoming]) -> Outcome:
        try:
            return await self._retry(lambda: store.apply(items), "applying a batch")
        except Exception as exc:  # noqa: BLE001 - isolate the record that fails
            log.warning("batch failed (%r); applying record by record", exc)
        outcome = Outcome()
        for item in items:
            try:
                one = await self._retry(lambda item=item: store.apply_one(item), "applying")
            except Exception as exc:  # noqa: BLE001 - this record is the bad one
                reason = f"processing failed: {exc!r}"
                key = getattr(item.record, "key", None)
                await self._dead_letters(
                    [
                        bus.dead_letter(
                            STAGE,
                            reason,
                            item.raw,
                            source=f"{item.topic}[{item.partition}]@{item.offset}",
                            key=key,
                        )
                    ]
                )
                await self._retry(lambda k=key, r=reason: store.record_error(k, r), "recording")
                continue
            outcome.syncs |= one.syncs
        return outcome

    async def _dead_letters(self, letters: list) -> None:
        futures = [
            await bus.send(
                self.producer, self.catalog.dead_letters, letter, key=letter.key or STAGE
            )
            for letter in letters
        ]
        await asyncio.gather(*futures)
        self.stats["dead_letters"] += len(letters)
        for letter in letters:
            log.warning("dead letter (%s): %s", letter.source, letter.reason)

    async def _retry(self, make: Any, what: str) -> Any:
        """Retry transient failures forever (at-least-once: never skip a record)."""
        delay = 0.2
        while True:
            try:
                return await make()
            except TRANSIENT as exc:
                log.warning("%s failed (%r); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _next_offsets(metas: Iterable[Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for meta in metas:
        out[meta.partition] = max(out.get(meta.partition, 0), meta.offset + 1)
    return out


def _shorten_fetch_wait(app: faust.App, wait_ms: int = 50) -> None:
    """Lower faust's hard-coded ``fetch_max_wait_ms=1500`` on its aiokafka consumer.

    aiokafka keeps one fetch request in flight per broker. While the busy
    history partitions still have buffered records, the request only names the
    idle ones (live, portal-events), and the broker parks it for the full wait:
    the agent then starves for up to 1.5 s at a time. faust has no setting for
    it; the value is read on every request, so setting it here takes effect.
    """
    thread = getattr(app.consumer, "_thread", None)
    fetcher = getattr(getattr(thread, "_consumer", None), "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
        fetcher._fetch_max_wait_ms = wait_ms
    else:
        log.warning("cannot tune the consumer's fetch wait (faust internals changed)")


async def _resume(coro: Any, waiting: Any) -> Any:
    """Finish a coroutine that was stepped by hand and is now waiting on ``waiting``.

    Does what an asyncio Task would do from there: wait for the future the
    coroutine yielded (``None``: a bare yield), then step it again; a
    cancellation while waiting is thrown into it.
    """
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # What Task.__step does with a yielded future before waiting on it.
                waiting._asyncio_future_blocking = False
                await waiting
        except asyncio.CancelledError as exc:
            step, arg = coro.throw, exc
        except BaseException:  # noqa: BLE001 - the coroutine reads it from its future
            step, arg = coro.send, None
        else:
            step, arg = coro.send, None
        try:
            waiting = step(arg)
        except StopIteration as stop:
            return stop.value


def _fast_delivery(app: faust.App) -> None:
    """Deliver each fetched record without faust's per-record ``wait_first``.

    faust's fetch loop hands every record to the streams with
    ``await self.wait_first(callback(message), self.suspend_flow.wait())``,
    which creates four tasks (callback, suspend flag, stopped and crashed
    flags) plus an ``asyncio.wait`` per record, only to be able to give up
    when the flow is suspended (rebalance) while the callback waits for room
    in a full stream buffer. Almost always the callback completes without
    waiting: step it by hand first, and only when it does have to wait (or the
    flow is suspended) fall back to faust's ``wait_first`` for the rest.
    """
    consumer = app.consumer
    if getattr(consumer, "_backflow_fast_delivery", False):
        return
    original = consumer.wait_first
    suspended = consumer.suspend_flow.is_set

    async def wait_first(*coros: Any, timeout: Any = None) -> Any:
        if len(coros) != 2 or timeout is not None or not asyncio.iscoroutine(coros[0]):
            return await original(*coros, timeout=timeout)
        deliver, suspend = coros
        if suspended():
            return await original(deliver, suspend)
        try:
            waiting = deliver.send(None)
        except StopIteration:
            suspend.close()
            return None  # faust's fetch loop ignores the result
        except BaseException:
            suspend.close()
            raise
        return await original(_resume(deliver, waiting), suspend)

    consumer.wait_first = wait_first
    consumer._backflow_fast_delivery = True


# Group errors after which rejoining cannot help: crash the worker (exit != 0).
FATAL_GROUP_ERRORS = (
    KafkaErrors.GroupAuthorizationFailedError,
    KafkaErrors.InconsistentGroupProtocolError,
    KafkaErrors.InvalidSessionTimeoutError,
    KafkaErrors.InvalidGroupIdError,
)


async def _consume_group_error(app: faust.App) -> None:
    """Hand a consumer-group error that aiokafka parked for the user back, so it rejoins.

    On an error it does not expect from JoinGroup/SyncGroup (the mock broker's
    ``InvalidRequest``, see docs/pipeline.md), aiokafka requests a rejoin, then
    parks its coordination task until the application "consumes" the error
    through ``AIOKafkaConsumer.getmany``/``getone``. faust never calls those
    (it reads the fetcher directly), so without this the task waits forever:
    the worker stays up, stops heartbeating, is dropped from the group and
    never rejoins. Consuming the error lets aiokafka rejoin; an error that a
    rejoin cannot cure (authorization, configuration, a dead coordination
    task) crashes the worker instead of leaving a silent zombie.
    """
    thread = getattr(app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_coordination_task", None)
    if coordinator is None or task is None:
        return
    # Racy reads from this thread are fine: a miss is caught on the next tick.
    if getattr(coordinator, "_pending_exception", None) is None and not task.done():
        return
    if getattr(coordinator, "_closing", None) is not None and coordinator._closing.done():
        return  # shutting down: the task ends on its own

    async def check() -> BaseException | None:
        try:
            coordinator.check_errors()  # must run on the consumer thread's loop
        except Exception as exc:  # noqa: BLE001 - classified below
            return exc
        return None

    exc = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(check(), thread.thread_loop))
    if exc is None:
        return
    if task.done() or isinstance(exc, FATAL_GROUP_ERRORS):
        log.critical("consumer group failed for good (%r): stopping the worker", exc)
        await app.crash(exc)
    else:
        log.warning("consumer group error (%r): rejoining the group", exc)


# How long the group leader holds its SyncGroup back when the group has other
# members (see _delay_leader_sync).
LEADER_SYNC_DELAY = 0.5


def _delay_leader_sync(app: faust.App) -> None:
    """Let followers send their SyncGroup before the leader sends the assignment.

    librdkafka's mock broker (tests, the embedded stack) completes a sync as
    soon as the leader's SyncGroup carries an assignment for every member, and
    drops the assignments of followers whose SyncGroup has not arrived yet:
    their late SyncGroup then finds the group Up and is answered
    ``INVALID_REQUEST`` (a real broker answers it from the stored assignment).
    Followers send SyncGroup right after their JoinGroup response while the
    leader first computes the assignment, so the leader wins that race only
    when a follower is descheduled; holding the leader back for
    ``LEADER_SYNC_DELAY`` turns that into "a follower stalled for half a
    second". Costs that much per rebalance of a group of two or more workers
    on any broker; a follower that still loses rejoins (_consume_group_error).
    """
    thread = getattr(app.consumer, "_thread", None)
    coordinator = getattr(getattr(thread, "_consumer", None), "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_perform_assignment"):
        log.warning("cannot delay the leader's SyncGroup (aiokafka internals changed)")
        return
    if getattr(coordinator, "_backflow_delayed_sync", False):
        return
    original = coordinator._perform_assignment

    async def perform_assignment(response: Any) -> Any:
        assignment = await original(response)
        if len(assignment) > 1:
            await asyncio.sleep(LEADER_SYNC_DELAY)  # on the consumer thread's loop
        return assignment

    coordinator._perform_assignment = perform_assignment
    coordinator._backflow_delayed_sync = True


async def _watch_group(app: faust.App, runtime: Runtime) -> None:
    while not runtime.stopped:
        await asyncio.sleep(0.5)
        try:
            await _consume_group_error(app)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the watch must not die
            log.exception("checking the consumer group failed")


def register(app: faust.App, settings: Settings, *, flush_chunk: int = 5000) -> Runtime:
    """Attach the pipeline's agent, timer and rebalance hooks to ``app``."""
    catalog = settings.catalog
    runtime = Runtime(settings, flush_chunk=flush_chunk)
    sources = app.topic(
        catalog.history,
        catalog.live,
        catalog.portal_events,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=catalog.partitions,
    )
    source_names = {catalog.history, catalog.live, catalog.portal_events}

    @app.agent(sources, name="portal-pipeline")
    async def portal_pipeline(stream: faust.StreamT) -> None:
        async for events in stream.take_events(5000, within=0.02):
            # take_events acks the batch when this body returns, even when it
            # is cancelled: finish the work first so no record is acked unapplied.
            task = asyncio.ensure_future(runtime.handle(events))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await task
                raise

    @app.timer(interval=0.5)
    async def flush_outbox() -> None:
        # Produces CreateRoom decided by another worker's sync ranking, and
        # anything a failed flush left behind.
        if runtime.ready and not runtime.stopped:
            runtime.wake_flusher()

    watch: list[asyncio.Future] = []

    def watch_group() -> None:
        # Not an @app.timer: faust starts those only after the first
        # assignment, and a first SyncGroup can be the one that fails.
        # Every JoinGroup is preceded by a revoke, so this starts in time.
        _delay_leader_sync(app)
        if not watch:
            watch.append(asyncio.ensure_future(_watch_group(app, runtime)))

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: set[TopicPartition], **_: Any) -> None:
        _shorten_fetch_wait(app)
        _fast_delivery(app)
        await runtime.on_assigned({tp.partition for tp in assigned if tp.topic in source_names})

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set[TopicPartition], **_: Any) -> None:
        watch_group()
        await runtime.on_revoked({tp.partition for tp in revoked if tp.topic in source_names})

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, **_: Any) -> None:
        for task in watch:
            task.cancel()
        await runtime.stop()

    return runtime

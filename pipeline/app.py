"""The faust app of the portal pipeline, configured for Apache Kafka and the mock broker.

The same settings run unpatched on both (BRIEF section 4): topics are never
declared by faust (the catalog provisions them), there is no leader topic and
no faust table (state lives in Postgres, so there is no changelog topic either),
and session/heartbeat timeouts are short because the mock broker waits a full
session timeout before each rebalance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import faust
from aiokafka import TopicPartition
from aiokafka import errors as KafkaErrors
from faust.sensors import Sensor
from faust.types import Message
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from pipeline.runtime import Runtime
from topics import bus
from topics.settings import Settings

log = logging.getLogger("backflow.pipeline")

# Faust settings used by every worker (documented in docs/pipeline.md).
FAUST_SETTINGS: dict[str, object] = {
    "store": "memory://",
    "topic_allow_declare": False,
    "topic_disable_leader": True,
    "topic_replication_factor": 1,
    # > 0 keeps faust's own PartitionAssignor (faust switches to round-robin
    # otherwise): it gives partition N of history, live and portal-events to
    # the same worker, which is what makes one worker own a portal.
    "table_standby_replicas": 1,
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 1.0,
    "broker_commit_interval": 1.0,
    "consumer_auto_offset_reset": "earliest",
    "processing_guarantee": "at_least_once",
    "producer_acks": -1,
    # Bigger fetches and buffers: the agent applies records in batches.
    "stream_buffer_maxsize": 16384,
    "broker_max_poll_records": 5000,
    "consumer_max_fetch_size": 4 * 1024 * 1024,
    "web_enabled": False,
    "autodiscover": False,
}


class PipelineApp(faust.App):
    """A faust app whose only sensor does nothing.

    faust always adds its ``Monitor`` sensor, which records statistics on every
    message and stream event (only the web server's metrics views read them,
    and the pipeline runs without one); replacing it with the no-op base
    ``Sensor`` saves that per-event work. (With no sensor at all faust warns
    "Missing sensor state" on every rebalance.) faust's consumer still calls
    the monitor object directly for commit and end-offset bookkeeping.
    """

    def on_init_dependencies(self) -> Any:
        deps = super().on_init_dependencies()
        for sensor in list(self.sensors):
            self.sensors.remove(sensor)
        self.sensors.add(Sensor())
        return deps


def make_app(
    settings: Settings, *, flush_chunk: int = 5000, flush_pause: float = 0.0
) -> faust.App:
    """The pipeline app: group ``<prefix>-pipeline`` over the catalog's topics."""
    catalog = settings.catalog
    datadir = settings.state_dir / "faust" / catalog.processor_group
    datadir.mkdir(parents=True, exist_ok=True)
    app = PipelineApp(
        catalog.processor_group,
        broker=f"kafka://{bus.bootstrap(settings)}",
        topic_partitions=catalog.partitions,
        datadir=str(datadir),
        **FAUST_SETTINGS,
    )
    runtime = register(app, settings, flush_chunk=flush_chunk, flush_pause=flush_pause)
    app.pipeline_runtime = runtime  # type: ignore[attr-defined]
    return app


# ---------------------------------------------------------------- faust glue


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


# ---------------------------------------------------------------- intake
#
# faust's per-record path from the fetcher to the agent is: conductor decodes
# each record into an Event and puts it on the channel queue; the Stream's
# iterator takes it (one event-loop round per record), tracks it, runs
# take_events' buffering processor on it and yields it to a passive drainer
# task; take_events then acks each Event (Event.ack -> Message.ack ->
# Consumer.ack) after the batch. The pipeline needs none of that per record:
# it applies whole batches and only reads topic, partition, offset, key and
# value. So the source topic puts the consumer's Message itself on the queue,
# and the agent drains that queue in bulk, hands the Messages on as they are,
# and tracks and acks a batch at once, keeping what faust's stream guarantees
# (see consume_batches).


class IntakeTopic(faust.Topic):
    """A raw-bytes topic whose records reach the channel queue as the consumer's Message.

    faust's conductor calls ``decode`` for every record (and would build an
    Event through the serializer registry); here it returns the Message as is.
    Only ``consume_batches`` may read this topic's stream.
    """

    def _compile_decode(self) -> None:
        async def decode(message: Message, *, propagate: bool = False) -> Any:
            return message

        self.decode = decode  # type: ignore[method-assign]


def intake_topic(app: faust.App, topics: Iterable[str], partitions: int) -> IntakeTopic:
    """The agent's source topics (key and value raw bytes)."""
    return IntakeTopic(
        app,
        topics=list(topics),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )


async def consume_batches(
    app: faust.App,
    stream: faust.StreamT,
    apply: Callable[[Any], Awaitable[None]],
    *,
    prepare: Callable[[list[Message]], Any] = list,
    max_records: int = 5000,
    within: float = 0.02,
) -> None:
    """Feed batches from an IntakeTopic stream to ``prepare`` then ``apply``; ack after apply.

    Takes up to ``max_records`` from the channel queue, waiting at most
    ``within`` seconds after the first one for more. ``prepare`` (CPU only:
    decoding) runs in this loop; ``apply`` (Postgres) runs as a task, so the
    next batch is taken and prepared while one applies: the worker decodes
    while the database works instead of waiting for it. Applies run one at a
    time, in batch order. Does what faust's
    stream does per record, once per batch where it can:

    - records fetched before a rebalance (flow suspended or an old consumer
      generation) are dropped unhandled, as the stream skips them (faust also
      acks them; not acking is the safe side: they are fetched again from the
      committed offset);
    - a taken record is tracked as unacked, so a rebalance's ``wait_empty``
      waits for its batch (at most two: one applying, one prepared) before
      committing;
    - a record is acked (its offset may be committed) only after ``apply``
      returned for its batch; a cancelled agent finishes its batches first; a
      failed ``apply`` acks nothing, nor does any batch after it (so no later
      offset is committed past the failed records): the agent crashes and is
      restarted by faust, the records are read again from the committed
      offset after the next rebalance or restart;
    - order is the queue's, i.e. per partition the fetch order.

    The no-op sensor (PipelineApp) is not called per record.
    """
    channel = stream.channel
    queue = channel.queue  # the iterating clone the conductor delivers to
    errors = queue._errors
    take = queue.get_nowait  # mode's get_nowait also resumes a paused fetch
    consumer = app.consumer
    unacked = consumer._unacked_messages
    flow_active = app.flow_control.is_active
    loop = asyncio.get_running_loop()
    applying: asyncio.Future | None = None  # the newest batch's apply
    try:
        while True:
            if applying is not None and applying.done():
                applying.result()  # raises if it failed: the agent stops here
            try:
                first = await queue.get()  # raises what was thrown into the channel
            except StopAsyncIteration:
                return  # the actor was told to stop reading (Actor.cancel)
            messages = [first]
            deadline = loop.time() + within
            while len(messages) < max_records:
                if errors:
                    break  # the batch taken so far still goes through
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        messages.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    messages.append(take())
            generation = app.consumer_generation_id
            if flow_active():
                batch = [m for m in messages if m.generation_id == generation]
            else:
                batch = []
            if not batch:
                continue
            # One tracked message per batch is enough for wait_empty to wait
            # for it (tracking all cost ~1 us a record in WeakSet.add).
            batch[-1].tracked = True
            unacked.add(batch[-1])
            try:
                prepared = prepare(batch)
                if applying is not None:
                    # One batch applies at a time, in order; this one was
                    # prepared while the one before applied.
                    await asyncio.shield(applying)  # raises if it failed
            except BaseException:
                unacked.discard(batch[-1])
                raise
            applying = asyncio.ensure_future(apply(prepared))
            # Acked when its apply is done, even while this loop waits for records.
            applying.add_done_callback(partial(_settle, consumer, batch))
    finally:
        if applying is not None and not applying.done():
            # A cancelled agent still finishes what it took, then stops.
            await asyncio.shield(asyncio.wait([applying]))


def _settle(consumer: Any, messages: list[Message], task: asyncio.Future) -> None:
    """Ack an applied batch; untrack one whose apply failed or was cancelled."""
    if task.done() and not task.cancelled() and task.exception() is None:
        _ack_batch(consumer, messages)
    else:
        # Not acked: their offsets stay uncommitted, so they are read again
        # after the next rebalance or restart. Untracked, so a rebalance's
        # wait_empty does not wait for them forever.
        consumer._unacked_messages.discard(messages[-1])


def _ack_batch(consumer: Any, messages: list[Message]) -> None:
    """What ``Message.ack`` -> ``Consumer.ack`` does per record, for a batch at once.

    Each record reached one channel (the agent's), so its last reference is
    dropped here, it is marked acked, and its offset goes into the consumer's
    acked offsets, from which faust commits the highest gapless offset per
    partition. faust's own path takes two re-entrant locks, a dict lookup per
    check and a WeakSet discard for every record (~2 us); this takes the lock
    once. Same bookkeeping, faust 0.15.x (pinned).
    """
    committed = consumer._committed_offset
    acked_index = consumer._acked_index
    acked = consumer._acked
    enabled: dict[str, bool] = {}
    n = 0
    with ack_lock:
        for message in messages:
            if message.acked:
                continue
            message.refcount = 0
            message.acked = True
            topic = message.topic
            if topic not in enabled:
                enabled[topic] = consumer.app.topics.acks_enabled_for(topic)
            if not enabled[topic]:
                continue
            tp, offset = message.tp, message.offset
            done = committed[tp]
            if done is None or offset >= done:
                index = acked_index[tp]
                if offset not in index:
                    index.add(offset)
                    acked[tp].append(offset)
                    n += 1
        consumer._n_acked += n
        consumer._unacked_messages.discard(messages[-1])
        notify(consumer._waiting_for_ack)


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


def register(
    app: faust.App, settings: Settings, *, flush_chunk: int = 5000, flush_pause: float = 0.0
) -> Runtime:
    """Attach the pipeline's agent, timer and rebalance hooks to ``app``."""
    catalog = settings.catalog
    runtime = Runtime(settings, flush_chunk=flush_chunk, flush_pause=flush_pause)
    names = [catalog.history, catalog.live, catalog.portal_events]
    source_names = set(names)
    sources = intake_topic(app, names, catalog.partitions)

    @app.agent(sources, name="portal-pipeline")
    async def portal_pipeline(stream: faust.StreamT) -> None:
        await consume_batches(app, stream, runtime.apply, prepare=runtime.prepare)

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

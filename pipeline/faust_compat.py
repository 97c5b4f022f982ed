"""Every use of private faust and aiokafka internals, behind one version check.

Supported: faust-streaming 0.15.x on aiokafka 0.14.x (pinned in pyproject.toml).
Importing this module with other versions raises RuntimeError naming these:
each patch below relies on code that upstream may change in any release, and
tests/pipeline/test_faust_compat.py pins what each one replaces (attribute,
signature or a hash of the upstream source), failing with "upstream changed:
re-check patch X" when it moves.

The patches, what upstream behaviour each replaces and why:

1. ``shorten_fetch_wait`` (all brokers): sets aiokafka's
   ``Fetcher._fetch_max_wait_ms`` to 50 ms; faust hard-codes 1500 ms in its
   aiokafka driver and has no setting for it. aiokafka keeps one fetch in
   flight per broker; while busy partitions still have buffered records it
   names only the idle ones and the broker parks it for the full wait,
   starving the agent for up to 1.5 s at a time. Without it bench_pipeline
   reaches 0.29 of the passthrough instead of 0.62 (docs/pipeline.md).
2. ``fast_delivery`` + ``_resume`` (all brokers): wraps faust's
   ``Consumer.wait_first`` as called by ``Consumer._drain_messages``, which
   spends four tasks and an ``asyncio.wait`` per record only to be able to
   give up on a full stream buffer when the flow is suspended. The callback
   is stepped by hand; only when it has to wait (or the flow is suspended)
   does faust's own ``wait_first`` take the rest, ``_resume`` continuing the
   coroutine as an asyncio Task would. Without it bench_pipeline reaches 0.30
   of the passthrough (worker 75 instead of 29 us per message).
3. ``IntakeTopic`` (``Topic._compile_decode``, all brokers): the conductor's
   decode returns faust's ``Message`` itself, without building an ``Event``
   through the serializer registry.
4. ``consume_batches`` / ``_settle`` / ``_ack_batch`` (all brokers): replaces
   ``Stream.take_events`` and the per-record ``Event.ack`` -> ``Message.ack``
   -> ``Consumer.ack`` bookkeeping with one ack per applied batch; reads the
   channel queue's ``_errors`` and the consumer's ``_unacked_messages``,
   ``_acked``, ``_acked_index``, ``_committed_offset``, ``_n_acked`` and
   ``_waiting_for_ack``. Patches 2-4 take worker CPU from 25 to 11 us per
   record (bench/bench_intake.py).
5. ``consume_group_error`` / ``watch_group`` (all brokers): aiokafka parks an
   unexpected JoinGroup/SyncGroup error (``GroupCoordinator._pending_exception``)
   until ``getmany``/``getone`` collect it; faust never calls them, so the
   coordination task would wait forever (a zombie worker). The watch calls
   ``GroupCoordinator.check_errors`` on the consumer thread's loop so aiokafka
   rejoins, and crashes the worker on errors a rejoin cannot cure.
6. ``delay_leader_sync`` (**mock broker only**): wraps aiokafka's
   ``GroupCoordinator._perform_assignment`` to hold the leader's SyncGroup back
   ``LEADER_SYNC_DELAY`` when the group has other members. librdkafka's mock
   cluster completes a sync as soon as the leader's SyncGroup arrives and
   answers a follower's later SyncGroup ``INVALID_REQUEST``; Apache Kafka
   answers it from the stored assignment. It is installed only when
   ``kafka.mock_broker`` is set (the embedded stack and the test fixtures set
   it where they start the mock cluster); on Apache Kafka the workaround is
   off and a rebalance costs no extra 0.5 s.

Not here: ``PipelineApp`` (pipeline/app.py) swaps faust's Monitor sensor for
the no-op ``Sensor`` through public API only (``on_init_dependencies``,
``app.sensors``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import faust
from aiokafka import errors as KafkaErrors
from faust.types import Message
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

log = logging.getLogger("backflow.pipeline")

# Distribution name -> supported version prefix.
SUPPORTED_VERSIONS: dict[str, str] = {"faust-streaming": "0.15.", "aiokafka": "0.14."}


def check_versions() -> None:
    """Raise RuntimeError unless the installed faust and aiokafka are the supported ones."""
    found: dict[str, str] = {}
    for dist in SUPPORTED_VERSIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    wrong = {d: v for d, v in found.items() if not v.startswith(SUPPORTED_VERSIONS[d])}
    if wrong:
        supported = ", ".join(f"{d} {p}x" for d, p in SUPPORTED_VERSIONS.items())
        installed = ", ".join(f"{d} {v}" for d, v in found.items())
        raise RuntimeError(
            f"pipeline.faust_compat supports {supported} only (installed: {installed}); "
            "its patches use private internals of those versions: re-check each one "
            "(tests/pipeline/test_faust_compat.py) before changing the pins"
        )


check_versions()


# ---------------------------------------------------------------- 1. fetch wait


def shorten_fetch_wait(app: faust.App, wait_ms: int = 50) -> None:
    """Lower faust's hard-coded ``fetch_max_wait_ms=1500`` on its aiokafka consumer.

    The value is read on every fetch request, so setting it after the
    consumer started takes effect.
    """
    thread = getattr(app.consumer, "_thread", None)
    fetcher = getattr(getattr(thread, "_consumer", None), "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
        fetcher._fetch_max_wait_ms = wait_ms
    else:
        log.warning("cannot tune the consumer's fetch wait (faust internals changed)")


# ---------------------------------------------------------------- 2. fast delivery


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


def fast_delivery(app: faust.App) -> None:
    """Deliver each fetched record without faust's per-record ``wait_first`` (idempotent).

    Almost always the delivery callback completes without waiting: step it by
    hand first, and only when it does have to wait (or the flow is suspended)
    fall back to faust's ``wait_first`` for the rest.
    """
    consumer = app.consumer
    if getattr(consumer, "_backflow_fast_delivery", False):
        return
    original = consumer.wait_first
    suspended = consumer.suspend_flow.is_set

    async def wait_first(*coros: Any, timeout: Any = None) -> Any:
        # Only _drain_messages' call shape is short-cut: (callback(message), suspend wait).
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


# ---------------------------------------------------------------- 3. intake topic


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


# ---------------------------------------------------------------- 4. batch intake and acks


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
    next batch is taken and prepared while one applies. Applies run one at a
    time, in batch order. Does what faust's stream does per record, once per
    batch where it can:

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
    once.
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


# ---------------------------------------------------------------- 5. group errors

# Group errors after which rejoining cannot help: crash the worker (exit != 0).
FATAL_GROUP_ERRORS = (
    KafkaErrors.GroupAuthorizationFailedError,
    KafkaErrors.InconsistentGroupProtocolError,
    KafkaErrors.InvalidSessionTimeoutError,
    KafkaErrors.InvalidGroupIdError,
)


async def consume_group_error(app: faust.App) -> None:
    """Hand a consumer-group error that aiokafka parked for the user back, so it rejoins.

    An error that a rejoin cannot cure (authorization, configuration, a dead
    coordination task) crashes the worker instead of leaving a silent zombie.
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


async def watch_group(app: faust.App, stopped: Callable[[], bool]) -> None:
    """Collect parked group errors every 0.5 s until ``stopped()``."""
    while not stopped():
        await asyncio.sleep(0.5)
        try:
            await consume_group_error(app)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the watch must not die
            log.exception("checking the consumer group failed")


# ---------------------------------------------------------------- 6. mock broker only

# How long the group leader holds its SyncGroup back when the group has other
# members (see delay_leader_sync).
LEADER_SYNC_DELAY = 0.5


def delay_leader_sync(app: faust.App) -> None:
    """Let followers send their SyncGroup before the leader sends the assignment.

    For librdkafka's mock broker only (see the module docstring). Followers
    send SyncGroup right after their JoinGroup response while the leader first
    computes the assignment, so the leader wins that race only when a follower
    is descheduled; holding the leader back turns that into "a follower
    stalled for half a second"; a follower that still loses rejoins
    (consume_group_error). Idempotent; the caller installs it only when
    ``kafka.mock_broker`` is set.
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

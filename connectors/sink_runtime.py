"""The runtime that drives a ``connectors.sink.SinkTask`` from a Kafka topic.

It owns what a connector should not care about: the consumer, the rebalance
listener, pause/resume for backpressure and offset commits. The commit
position always comes from the task's ``flush()``, so it never passes a
record whose effect is not durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from connectors.sink import SinkTask

log = logging.getLogger("backflow.sink.runtime")

COMMIT_INTERVAL = 0.5  # seconds between offset commits
FETCH_RECORDS = 1000  # records per getmany
# Group errors in a row before giving up; a rejoin cures one, not a broken group.
MAX_GROUP_ERRORS = 20
# No rejoin cures these: the operator must grant the ACLs.
GROUP_FATAL = (GroupAuthorizationFailedError, TopicAuthorizationFailedError)


class Committer:
    """Commits the task's durable positions, skipping ones already committed."""

    def __init__(self, consumer: AIOKafkaConsumer, task: SinkTask) -> None:
        self.consumer = consumer
        self.task = task
        self._committed: dict[TopicPartition, int] = {}

    async def commit(self) -> None:
        assigned = self.consumer.assignment()
        offsets = {
            tp: o
            for tp, o in self.task.flush().items()
            if tp in assigned and self._committed.get(tp) != o
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self._committed.update(offsets)
        except Exception as exc:  # rebalancing: the next commit catches up
            log.warning("offset commit failed (%s); will retry", exc)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._committed.pop(tp, None)


class Rebalance(ConsumerRebalanceListener):
    """On revocation: let the task finish those partitions, commit, then forget them."""

    def __init__(self, task: SinkTask, committer: Committer) -> None:
        self.task = task
        self.committer = committer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # The next owner starts after what we commit here; anything unfinished
        # is redelivered to it (and settled there: effects are idempotent).
        revoked = set(revoked)
        await self.task.close(revoked)
        await self.committer.commit()
        self.task.forget(revoked)
        self.committer.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


async def run_task(
    task: SinkTask,
    consumer: AIOKafkaConsumer,
    committer: Committer,
    stop: asyncio.Event,
    idle_exit: float | None = None,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Feed ``task`` from the (started, subscribed) consumer until ``stop`` or idle.

    ``on_tick`` runs after each commit (progress reporting).
    """
    last_commit = time.monotonic()
    group_errors = 0
    last_activity: float | None = None
    paused: set[TopicPartition] = set()
    try:
        while not stop.is_set():
            # Backpressure per partition: only the partitions feeding a backed-up
            # room stop fetching; the others keep flowing. We keep polling, so
            # the worker stays in the group.
            assigned = consumer.assignment()
            full = task.full() & assigned
            if full != paused:
                if full - paused:
                    consumer.pause(*(full - paused))
                if (paused - full) & assigned:
                    consumer.resume(*((paused - full) & assigned))
                paused = full
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=FETCH_RECORDS)
            except GROUP_FATAL:
                raise
            except KafkaError as exc:
                # A failed JoinGroup/SyncGroup (the mock broker answers a late
                # follower's SyncGroup with INVALID_REQUEST): aiokafka parks the
                # group until the error is collected, here, and then rejoins.
                group_errors += 1
                if group_errors > MAX_GROUP_ERRORS:
                    raise
                log.warning("consumer group error (%r); rejoining", exc)
                await asyncio.sleep(0.2)
                continue
            group_errors = 0
            now = time.monotonic()
            got = False
            for records in batches.values():
                if records:
                    got = True
                    await task.put(records)
            if got or task.pending():
                last_activity = now
            elif last_activity is None and assigned:
                last_activity = now  # idle clock starts once we own partitions
            if now - last_commit >= COMMIT_INTERVAL:
                await committer.commit()
                last_commit = now
                if on_tick is not None:
                    on_tick()
            if (
                idle_exit is not None
                and last_activity is not None
                and not task.pending()
                and now - last_activity >= idle_exit
            ):
                break
    finally:
        # Let the task finish its current work, then commit what is durable.
        await task.stop()
        await committer.commit()
        if on_tick is not None:
            on_tick()

"""The sink connector contract, beside the source contract (``connectors.source``).

Modelled on Kafka Connect's ``SinkTask``: the connector only makes an
external system match the records it is handed; the *runtime*
(``connectors.sink_runtime.run_task``) owns the consumer, the group
membership, pausing and offset commits. Lifecycle, in the order the runtime
calls the hooks:

* ``start()``: open whatever the task needs (clients, pools).
* ``put(records)``: hand over consumed records, in partition order. ``put``
  may return before their effects are done (work runs in the background);
  the task must not lose a record it accepted.
* ``flush()``: the offsets safe to commit, per partition: the position
  *after* the last record whose effect is durable, never past an unfinished
  one. The runtime commits them (at-least-once: a record whose effect
  happened but whose offset was not committed is handed over again, so the
  effects must be idempotent).
* ``full()``: partitions the runtime should stop fetching for now
  (backpressure); it keeps polling so the worker stays in the group.
* ``close(partitions)``: the partitions are being revoked: finish (or give
  up on) their in-flight records; the runtime commits ``flush()`` right after,
  then calls ``forget(partitions)``.
* ``pending()``: records accepted and not yet finished (idle detection).
* ``stop()``: finish in-flight work within a bound and release resources.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord


class SinkTask(ABC):
    """A sink connector: records in, effects out; the runtime commits offsets."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open resources before the first ``put``."""

    @abstractmethod
    async def put(self, records: Sequence[ConsumerRecord]) -> None:
        """Accept records (in partition order); effects may complete later."""

    @abstractmethod
    def flush(self) -> dict[TopicPartition, int]:
        """Per partition, the next offset to consume once restarted (safe to commit)."""

    def full(self) -> set[TopicPartition]:
        """Partitions to pause because what they feed is backed up."""
        return set()

    @abstractmethod
    def pending(self) -> int:
        """Records accepted whose effect is not finished yet."""

    @abstractmethod
    async def close(self, partitions: set[TopicPartition]) -> None:
        """Partitions are being revoked: finish their in-flight records (bounded)."""

    @abstractmethod
    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop bookkeeping for revoked partitions (after the final commit)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Finish in-flight work (bounded) and release resources."""

"""Kafka clients for every stage: one way to produce records and dead letters.

Every stage talks to Kafka through these helpers so that producer settings
(acks=all, idempotence) and the dead-letter shape are the same everywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from topics.codec import encode
from topics.records import Record
from topics.settings import Settings


class BusError(RuntimeError):
    """Kafka is not configured or not reachable: one clear line for the operator."""


def bootstrap(settings: Settings) -> str:
    if not settings.kafka.bootstrap:
        raise BusError(
            "no Kafka broker configured: set BACKFLOW_KAFKA_BOOTSTRAP "
            "or start the embedded stack with `backflow stack up`"
        )
    return settings.kafka.bootstrap


def producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """An idempotent producer: retries inside the client never duplicate records."""
    options: dict[str, object] = {
        "bootstrap_servers": bootstrap(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(settings: Settings, *topics: str, group: str, **overrides: object) -> AIOKafkaConsumer:
    """A group consumer that commits only what the caller has finished (at-least-once)."""
    options: dict[str, object] = {
        "bootstrap_servers": bootstrap(settings),
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": 6_000,
        "heartbeat_interval_ms": 1_000,
        "max_poll_records": 500,
        # aiokafka keeps one fetch in flight per broker; while some partitions
        # still have buffered records it names only the idle ones, and the
        # broker parks it for the whole wait (default 500 ms), so a consumer of
        # unevenly busy partitions stalls for that long (see pipeline/app.py).
        "fetch_max_wait_ms": 50,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def reader(settings: Settings, **overrides: object) -> AIOKafkaConsumer:
    """A group-less consumer: assigned to partitions and positioned by its caller."""
    options: dict[str, object] = {
        "bootstrap_servers": bootstrap(settings),
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": 50,
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)


async def read_to_end(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]
) -> AsyncIterator[ConsumerRecord]:
    """Every record from each partition's position up to ``ends`` (exclusive).

    For an assigned, positioned consumer (scans of a topic as it is now: the
    dead-letter commands, replay). Memory holds one fetch at a time.
    """
    open_ = {tp for tp in ends if await consumer.position(tp) < ends[tp]}
    while open_:
        batches = await consumer.getmany(*open_, timeout_ms=500)
        for tp, messages in batches.items():
            for m in messages:
                if m.offset >= ends[tp]:
                    break
                yield m
        for tp in list(open_):
            if await consumer.position(tp) >= ends[tp]:
                open_.discard(tp)


async def start(client: AIOKafkaProducer | AIOKafkaConsumer, settings: Settings) -> None:
    """Start a client, turning connection failures into one clear line."""
    try:
        await client.start()
    except Exception as exc:  # aiokafka raises several unrelated types here
        await client.stop()
        raise BusError(f"cannot reach Kafka at {settings.kafka.bootstrap}: {exc}") from None


async def send(producer: AIOKafkaProducer, topic: str, record: Record, key: str | None = None):
    """Queue one record keyed by its portal; returns the delivery future."""
    key = key if key is not None else record.key  # type: ignore[union-attr]
    return await producer.send(topic, encode(record), key=key.encode())


async def send_all(producer: AIOKafkaProducer, topic: str, records: Iterable[Record]) -> int:
    """Publish records and wait until the broker acknowledged every one."""
    futures = [await send(producer, topic, r) for r in records]
    for f in futures:
        await f
    return len(futures)

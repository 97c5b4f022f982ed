"""Small helpers shared by integration tests (no fakes: real broker reads)."""

from __future__ import annotations

import asyncio
import socket
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from backflow.settings import Settings
from topics.codec import decode
from topics.records import Record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_topic(
    settings: Settings, topic: str, expect: int | None = None, timeout: float = 30.0
) -> list[Record]:
    """Every record in a topic, from the beginning, without a consumer group.

    With ``expect``, waits until at least that many arrived (or times out and
    returns what is there, so the caller's assertion shows the difference);
    without it, reads up to the current end of every partition.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for messages in batch.values():
                out.extend(decode(m.value) for m in messages)
            if expect is not None:
                if len(out) >= expect:
                    # A little longer to catch extras (duplicates) that would follow.
                    await asyncio.sleep(0.3)
                    for messages in (await consumer.getmany(timeout_ms=300)).values():
                        out.extend(decode(m.value) for m in messages)
                    break
            else:
                ends = await consumer.end_offsets(partitions)
                if all(await consumer.position(tp) >= ends[tp] for tp in partitions):
                    break
        return out
    finally:
        await consumer.stop()

"""The embedded broker (librdkafka mock cluster) against real clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from backflow.stack.kafka import EmbeddedKafka, EmbeddedKafkaError
from tests.helpers import TESTS


@pytest.fixture(scope="module")
def kafka() -> Iterator[EmbeddedKafka]:
    broker = EmbeddedKafka()
    try:
        yield broker
    finally:
        broker.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_create_topic_idempotent_and_checked(kafka: EmbeddedKafka) -> None:
    topic = _name("t")
    kafka.create_topic(topic, 3)
    kafka.create_topic(topic, 3)  # same shape: no-op
    assert kafka.partition_count(topic) == 3
    with pytest.raises(EmbeddedKafkaError, match="already exists with 3 partitions"):
        kafka.create_topic(topic, 5)
    assert kafka.partition_count(_name("absent")) is None
    with pytest.raises(ValueError):
        kafka.create_topic(_name("t"), 1, replication=2)


async def _consume(
    consumer: AIOKafkaConsumer, n: int, timeout: float = 20, proc: subprocess.Popen | None = None
) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only got {len(out)} of {n} records"
        assert proc is None or proc.poll() is None, f"worker exited with {proc.returncode}"
        batch = await consumer.getmany(timeout_ms=500)
        for records in batch.values():
            out.extend(records)
    return out


async def test_aiokafka_produce_consume_commit_resume(kafka: EmbeddedKafka) -> None:
    topic, group = _name("aio"), _name("g")
    kafka.create_topic(topic, 2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(
                topic, value=f"v{i}".encode(), key=f"k{i % 3}".encode(),
                headers=[("h", f"{i}".encode())],
            )
    finally:
        await producer.stop()

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic, bootstrap_servers=kafka.bootstrap, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=6000, heartbeat_interval_ms=1000,
        )

    c1 = consumer()
    await c1.start()
    try:
        got = await _consume(c1, 10)
        assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(10))
        assert all(dict(r.headers)["h"] == r.value[1:] for r in got)
        # Commit only the first 6 records per their partitions.
        firsts = sorted(got, key=lambda r: int(r.value[1:]))[:6]
        offsets: dict[TopicPartition, int] = {}
        for r in firsts:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        await c1.commit(offsets)
    finally:
        await c1.stop()

    expected = {r.value for r in got} - {
        r.value
        for r in got
        if r.offset < offsets.get(TopicPartition(r.topic, r.partition), 0)
    }
    c2 = consumer()
    await c2.start()
    try:
        resumed = await _consume(c2, len(expected))
        assert {r.value for r in resumed} == expected
        await asyncio.sleep(0.5)
        assert not any((await c2.getmany(timeout_ms=300)).values())
    finally:
        await c2.stop()


async def test_faust_agent_runs_on_mock_cluster(kafka: EmbeddedKafka, tmp_path: Path) -> None:
    app_id, src, dst, parts = _name("app"), _name("in"), _name("out"), 2
    # Provision every topic faust will touch, with matching partition counts.
    for topic in (src, dst, f"{app_id}-counts-changelog"):
        kafka.create_topic(topic, parts)
    env = dict(
        os.environ,
        BACKFLOW_KAFKA_BOOTSTRAP=kafka.bootstrap,
        FAUST_APP_ID=app_id, FAUST_IN_TOPIC=src, FAUST_OUT_TOPIC=dst,
        FAUST_PARTITIONS=str(parts), FAUST_DATADIR=str(tmp_path / "faust"),
    )
    log = open(tmp_path / "faust.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "faust_stack_app.py")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    consumer = AIOKafkaConsumer(
        dst, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    try:
        await consumer.start()
        await producer.start()
        for i in range(6):
            key = b"a" if i % 2 else b"b"
            await producer.send_and_wait(src, key=key, value=f"m{i}".encode())
        started = time.monotonic()
        got = await _consume(consumer, 6, timeout=40, proc=proc)
        print(f"faust round trip after {time.monotonic() - started:.1f}s")
        values = sorted(r.value.decode() for r in got)
        assert values == ["m0|1", "m1|1", "m2|2", "m3|2", "m4|3", "m5|3"]
        assert proc.poll() is None
    finally:
        await producer.stop()
        await consumer.stop()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if sys.exc_info()[0] is not None:
            print((tmp_path / "faust.log").read_text()[-4000:])

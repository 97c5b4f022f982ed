"""Benchmark: the portal pipeline vs a raw aiokafka consume-and-produce passthrough.

100,000 history messages over 1,000 portals (plus their PortalInfo and
HistoryComplete) go through hold and release on the embedded broker: a
pipeline worker (subprocess) holds them in Postgres, asks for rooms, a bench
sink answers every CreateRoom with RoomCreated, and the worker releases the
held messages as SendMessage commands. The same records then go through a raw
aiokafka consumer that produces each one to another topic. Both clocks start
when publishing starts and stop at the last output record, with the consumer
already running, so the two figures are comparable. Both publishers are
flow-controlled (see WINDOW): the embedded broker drops records beyond ~5 MB
per partition, which a 1M-message run would otherwise hit.

    .venv/bin/python bench/bench_pipeline.py [--portals 1000] [--per-portal 100]

Postgres: BACKFLOW_DATABASE_URL's server if set, else 127.0.0.1:5432, else pgserver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backflow import bus  # noqa: E402
from backflow.settings import load  # noqa: E402
from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from backflow.stack.postgres import create_database, drop_database, resolve_admin_url  # noqa: E402
from tests.pipeline_support import BASE_TS, Worker, done, info, msg  # noqa: E402
from topics.codec import encode  # noqa: E402
from topics.provision import provision  # noqa: E402
from topics.records import RoomCreated  # noqa: E402


def make_records(portals: int, per_portal: int) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for p in range(portals):
        portal = f"bench{p:05d}"
        key = f"testnet:{portal}".encode()
        out.append((key, encode(info(portal))))
        for i in range(per_portal):
            out.append((key, encode(msg(portal, f"m{i:05d}", BASE_TS + p * 7 + i * 1000))))
        out.append((key, encode(done(portal))))
    return out


# The embedded broker (librdkafka's mock cluster) keeps at most 5 MB or
# 100,000 records per partition and silently drops the oldest beyond that. A
# publisher running far ahead of its consumer would lose records (the consumer
# logs "Fetch offset ... out of range, resetting offset" and never sees them),
# so a run of more than ~100k records stalls forever. Publishing is therefore
# flow-controlled, the same way for both sides: at most WINDOW records ahead of
# what the consumer has *consumed* (~10k per partition of 8, ~3 MB, well under
# the broker's limit). For the passthrough that is what it has produced; for
# the pipeline, its consumer group's committed offsets (held messages are
# consumed: they are in Postgres; gating on sent commands instead would
# throttle the publisher for the pipeline's holding, which is its job).
WINDOW = 80_000
CHUNK = 5_000


async def publish(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes, bytes]],
    consumed: Callable[[], Awaitable[float]] | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = []
        for start in range(0, len(records), CHUNK):
            if consumed is not None:
                while start + CHUNK - await consumed() > WINDOW:
                    await asyncio.sleep(0.05)
            futures += [
                await producer.send(topic, v, key=k) for k, v in records[start : start + CHUNK]
            ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def committed_by(
    admin: AIOKafkaAdminClient, group: str, topic: str, partitions: int
) -> Callable[[], Awaitable[float]]:
    """How many records of ``topic`` ``group`` has consumed (committed offsets, summed)."""
    # The partitions must be named: the mock broker cannot list "all of them".
    tps = [TopicPartition(topic, p) for p in range(partitions)]

    async def consumed() -> float:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        return float(sum(meta.offset for meta in offsets.values() if meta.offset > 0))

    return consumed


async def _value(x: float) -> float:
    return x


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (more stable than wall time on a busy box)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_cpu_seconds(database: str) -> float:
    """CPU time of the Postgres backends serving ``database`` (found by process title)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes()
            if b"postgres" in title and database.encode() in title:
                total += cpu_seconds(int(proc.name))
        except OSError:
            continue
    return total


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench_pipeline(
    settings, records: list[tuple[bytes, bytes]], messages: int, workdir: Path
) -> tuple[float, float, float, float]:
    cat = settings.catalog
    knobs = {k: v for k, v in os.environ.items() if k.startswith("BACKFLOW_PIPELINE_")}
    worker = Worker(settings, workdir / "worker.log", **knobs)
    bootstrap = settings.kafka.bootstrap
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()
    await admin.start()
    try:
        tps = [TopicPartition(cat.matrix_commands, p) for p in range(cat.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Wait until the worker owns every partition and has read back the log.
        deadline = time.monotonic() + 60
        while "pipeline owns partitions" not in worker.log():
            if not worker.alive() or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start:\n{worker.log()[-3000:]}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        cpu0 = cpu_seconds(worker.proc.pid)
        database = settings.database.url.rsplit("/", 1)[-1].split("?")[0]
        pg0 = backend_cpu_seconds(database)
        started = time.monotonic()
        sends = 0
        publisher = asyncio.create_task(
            publish(
                bootstrap,
                cat.history,
                records,
                committed_by(admin, cat.processor_group, cat.history, cat.partitions),
            )
        )
        while sends < messages:
            if not worker.alive():
                raise SystemExit(f"worker died:\n{first_error(worker.log())}")
            if time.monotonic() - started > 600:
                raise SystemExit(f"pipeline timed out after {sends} sends")
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    if r.value.startswith(b'{"type":"send"'):
                        sends += 1
                        continue
                    cmd = orjson.loads(r.value)  # create_room: the sink creates the room
                    created = RoomCreated(
                        network=cmd["network"], portal=cmd["portal"], room_id="!r:bench"
                    )
                    await producer.send(cat.portal_events, encode(created), key=r.key)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(worker.proc.pid) - cpu0
        pg_cpu = backend_cpu_seconds(database) - pg0
        await publisher
        rss = peak_rss_mb(worker.proc.pid)
        return elapsed, rss, cpu, pg_cpu
    finally:
        worker.stop()
        await consumer.stop()
        await producer.stop()
        await admin.close()


async def bench_passthrough(
    settings, kafka: EmbeddedKafka, records: list[tuple[bytes, bytes]]
) -> float:
    src, dst = f"{settings.kafka.topic_prefix}.pt-in", f"{settings.kafka.topic_prefix}.pt-out"
    for topic in (src, dst):
        kafka.create_topic(topic, settings.kafka.partitions)
    consumer = bus.consumer(settings, src, group=f"{settings.kafka.topic_prefix}-pt")
    producer = bus.producer(settings, linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        started = time.monotonic()
        done_count = 0
        publisher = asyncio.create_task(
            publish(settings.kafka.bootstrap, src, records, lambda: _value(done_count))
        )
        while done_count < len(records):
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            futures = []
            for recs in batch.values():
                for r in recs:
                    futures.append(await producer.send(dst, r.value, key=r.key))
            await asyncio.gather(*futures)
            if batch:
                await consumer.commit()  # at-least-once, like the pipeline
            done_count += len(futures)
        elapsed = time.monotonic() - started
        await publisher
        return elapsed
    finally:
        await consumer.stop()
        await producer.stop()


def first_error(log: str) -> str:
    """The first traceback of a worker log (the cause), else its tail."""
    at = log.find("Traceback")
    return log[at : at + 5000] if at >= 0 else log[-3000:]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portals", type=int, default=1000)
    parser.add_argument("--per-portal", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    messages = args.portals * args.per_portal
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    kafka = EmbeddedKafka()
    admin, embedded_pg = await resolve_admin_url(os.environ.get("BACKFLOW_DATABASE_URL"), workdir)
    db = f"bench_{uuid.uuid4().hex[:10]}"
    db_url = await create_database(admin, db)
    settings = load(env={}).with_overrides(
        {
            "kafka.bootstrap": kafka.bootstrap,
            "kafka.topic_prefix": f"bench{uuid.uuid4().hex[:8]}",
            "kafka.partitions": args.partitions,
            "database.url": db_url,
            "state_dir": str(workdir / "state"),
        }
    )
    await provision(settings.catalog, embedded=kafka)
    records = make_records(args.portals, args.per_portal)
    try:
        pipe_s, rss, cpu, pg_cpu = await bench_pipeline(settings, records, messages, workdir)
        pass_s = await bench_passthrough(settings, kafka, records)
    finally:
        await drop_database(admin, db)
        if embedded_pg is not None:
            embedded_pg.stop()
        kafka.close()
    pipe_rate, pass_rate = messages / pipe_s, len(records) / pass_s
    print(f"records: {messages} messages over {args.portals} portals ({len(records)} records)")
    print(f"pipeline (hold + room + ordered release): {pipe_s:6.2f}s  {pipe_rate:9.0f} msgs/s")
    print(f"raw aiokafka passthrough:                 {pass_s:6.2f}s  {pass_rate:9.0f} msgs/s")
    print(f"ratio pipeline/passthrough: {pipe_rate / pass_rate:.2f} (target >= 0.5)")
    print(f"worker peak RSS: {rss:.0f} MB")
    print(f"worker CPU: {cpu:.2f}s ({cpu / messages * 1e6:.0f} us per message)")
    print(f"Postgres backends' CPU: {pg_cpu:.2f}s ({pg_cpu / messages * 1e6:.0f} us per message)")


if __name__ == "__main__":
    asyncio.run(main())

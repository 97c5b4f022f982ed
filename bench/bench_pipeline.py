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

The two alternate for ``--rounds`` rounds (default 3; each pipeline round
with new portals, on the same worker; each passthrough round on new topics)
and the ratio reported is the median of the rounds' ratios: on a shared
2-core machine one round's wall time swings by tens of percent.

    .venv/bin/python bench/bench_pipeline.py [--portals 1000] [--per-portal 100] [--rounds 3]

Postgres: BACKFLOW_DATABASE_URL's server if set, else 127.0.0.1:5432, else pgserver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
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

from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from backflow.stack.postgres import create_database, drop_database, resolve_admin_url  # noqa: E402
from tests.pipeline_support import BASE_TS, Worker, done, info, msg  # noqa: E402
from topics import bus  # noqa: E402
from topics.codec import encode  # noqa: E402
from topics.provision import provision  # noqa: E402
from topics.records import RoomCreated  # noqa: E402
from topics.settings import load  # noqa: E402


def make_records(portals: int, per_portal: int, round_no: int = 0) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for p in range(portals):
        portal = f"bench{round_no}x{p:05d}"
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


class PipelineBench:
    """One pipeline worker and the bench's sink, kept across rounds."""

    def __init__(self, settings, workdir: Path) -> None:
        self.settings = settings
        cat = settings.catalog
        knobs = {k: v for k, v in os.environ.items() if k.startswith("BACKFLOW_PIPELINE_")}
        self.worker = Worker(settings, workdir / "worker.log", **knobs)
        bootstrap = settings.kafka.bootstrap
        # The bench's sink: the same fetch wait as every backflow consumer (bus.consumer).
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.consumed = committed_by(self.admin, cat.processor_group, cat.history, cat.partitions)
        self.database = settings.database.url.rsplit("/", 1)[-1].split("?")[0]

    async def start(self) -> None:
        cat = self.settings.catalog
        await self.consumer.start()
        await self.producer.start()
        await self.admin.start()
        tps = [TopicPartition(cat.matrix_commands, p) for p in range(cat.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        # Wait until the worker owns every partition and has read back the log.
        deadline = time.monotonic() + 60
        while "pipeline owns partitions" not in self.worker.log():
            if not self.worker.alive() or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start:\n{self.worker.log()[-3000:]}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)

    async def round(
        self, records: list[tuple[bytes, bytes]], messages: int
    ) -> tuple[float, float, float]:
        """Publish one round's records; (seconds to the last send, worker CPU, Postgres CPU)."""
        cat = self.settings.catalog
        worker = self.worker
        cpu0 = cpu_seconds(worker.proc.pid)
        pg0 = backend_cpu_seconds(self.database)
        base = await self.consumed()

        async def consumed() -> float:
            return await self.consumed() - base

        started = time.monotonic()
        sends = 0
        publisher = asyncio.create_task(
            publish(self.settings.kafka.bootstrap, cat.history, records, consumed)
        )
        while sends < messages:
            if not worker.alive():
                raise SystemExit(f"worker died:\n{first_error(worker.log())}")
            if time.monotonic() - started > 600:
                raise SystemExit(f"pipeline timed out after {sends} sends")
            batch = await self.consumer.getmany(timeout_ms=200, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    if r.value.startswith(b'{"type":"send"'):
                        sends += 1
                        continue
                    cmd = orjson.loads(r.value)  # create_room: the sink creates the room
                    created = RoomCreated(
                        network=cmd["network"], portal=cmd["portal"], room_id="!r:bench"
                    )
                    await self.producer.send(cat.portal_events, encode(created), key=r.key)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(worker.proc.pid) - cpu0
        pg_cpu = backend_cpu_seconds(self.database) - pg0
        await publisher
        return elapsed, cpu, pg_cpu

    async def stop(self) -> float:
        """Stop everything; the worker's peak RSS in MB."""
        rss = peak_rss_mb(self.worker.proc.pid) if self.worker.alive() else float("nan")
        self.worker.stop()
        await self.consumer.stop()
        await self.producer.stop()
        await self.admin.close()
        return rss


async def bench_passthrough(
    settings, kafka: EmbeddedKafka, records: list[tuple[bytes, bytes]], round_no: int = 0
) -> float:
    prefix = f"{settings.kafka.topic_prefix}.pt{round_no}"
    src, dst = f"{prefix}-in", f"{prefix}-out"
    for topic in (src, dst):
        kafka.create_topic(topic, settings.kafka.partitions)
    consumer = bus.consumer(settings, src, group=f"{prefix}-group")
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
    parser.add_argument("--rounds", type=int, default=3)
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
    total = args.portals * (args.per_portal + 2)
    print(f"records: {messages} messages over {args.portals} portals ({total} records) per round")
    print(
        f"{'round':>5}  {'pipeline msgs/s':>15}  {'passthrough msgs/s':>18}  {'ratio':>5}  "
        f"{'worker us/msg':>13}  {'Postgres us/msg':>15}"
    )
    pipeline = PipelineBench(settings, workdir)
    ratios, cpus, pg_cpus = [], [], []
    try:
        await pipeline.start()
        for n in range(args.rounds):
            records = make_records(args.portals, args.per_portal, n)
            pipe_s, cpu, pg_cpu = await pipeline.round(records, messages)
            pass_s = await bench_passthrough(settings, kafka, records, n)
            pipe_rate, pass_rate = messages / pipe_s, len(records) / pass_s
            ratios.append(pipe_rate / pass_rate)
            cpus.append(cpu / messages * 1e6)
            pg_cpus.append(pg_cpu / messages * 1e6)
            print(
                f"{n + 1:>5}  {pipe_rate:>15.0f}  {pass_rate:>18.0f}  {ratios[-1]:>5.2f}  "
                f"{cpus[-1]:>13.0f}  {pg_cpus[-1]:>15.0f}",
                flush=True,
            )
        rss = await pipeline.stop()
    finally:
        if pipeline.worker.alive():
            await pipeline.stop()
        await drop_database(admin, db)
        if embedded_pg is not None:
            embedded_pg.stop()
        kafka.close()
    print(
        f"ratio pipeline/passthrough, median of {args.rounds}: "
        f"{statistics.median(ratios):.2f} (target >= 0.5)"
    )
    print(
        f"worker CPU per message, median: {statistics.median(cpus):.0f} us; "
        f"Postgres backends': {statistics.median(pg_cpus):.0f} us"
    )
    print(f"worker peak RSS: {rss:.0f} MB ({args.rounds * messages} messages held and released)")


if __name__ == "__main__":
    asyncio.run(main())

"""Helpers for the pipeline tests and benchmark: workers as subprocesses, a fake sink.

The pipeline is tested against the real broker and a real Postgres; the test
plays the Matrix sink's role: it reads matrix-commands and answers each
CreateRoom with a RoomCreated on portal-events.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.helpers import read_raw, stage_env
from topics.codec import decode, encode
from topics.records import (
    Content,
    CreateRoom,
    HistoryComplete,
    NetworkMessage,
    PortalInfo,
    Record,
    RoomCreated,
    Sender,
    SendMessage,
    SyncComplete,
)
from topics.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BASE_TS = 1_700_000_000_000


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def pipeline_settings(
    kafka: Any, pg_admin: str, tmp_path: Path, partitions: int = 4, **overrides: object
) -> Settings:
    """Own topic prefix, own database, topics provisioned; no homeserver needed."""
    from tests.conftest import make_settings

    settings, _ = await make_settings(
        kafka, pg_admin, None, None, tmp_path, **{"kafka.partitions": partitions, **overrides}
    )
    return settings


class Worker:
    """``python -m pipeline.worker`` in a subprocess, its output in a log file."""

    def __init__(
        self, settings: Settings, log: Path, *, code: str | None = None, **extra_env: str
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        cwd = settings.state_dir  # no backflow.yaml of the developer is picked up
        cwd.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code] if code else [sys.executable, "-m", "pipeline.worker"],
            env=stage_env(settings, PYTHONPATH=str(ROOT), **extra_env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# A worker whose first follower SyncGroup goes out late (after the leader's):
# on the mock broker that SyncGroup is answered INVALID_REQUEST.
LATE_FIRST_SYNC_WORKER = """
import asyncio
from aiokafka.consumer import group_coordinator as gc

original = gc.CoordinatorGroupRebalance._on_join_follower
calls = []

async def late_first_sync(self):
    calls.append(1)
    if len(calls) == 1:
        await asyncio.sleep({delay})
    return await original(self)

gc.CoordinatorGroupRebalance._on_join_follower = late_first_sync
from pipeline.worker import main
main()
"""


def msg(
    portal: str,
    mid: str,
    ts: int,
    *,
    network: str = "testnet",
    history: bool = True,
    kind: str = "text",
    target: str | None = None,
    part: int = 0,
) -> NetworkMessage:
    if kind == "reaction":
        content = Content(kind="reaction", target=target, key="👍")
    elif kind == "edit":
        content = Content(kind="edit", target=target, body=f"edited {mid}")
    elif kind == "redaction":
        content = Content(kind="redaction", target=target)
    else:
        content = Content(kind="text", body=f"body {mid}")
    return NetworkMessage(
        network=network,
        portal=portal,
        id=mid,
        sender=Sender(id="alice", name="Alice"),
        ts=ts,
        content=content,
        history=history,
        part=part,
    )


def info(portal: str, network: str = "testnet") -> PortalInfo:
    return PortalInfo(network=network, portal=portal, name=f"Chat {portal}")


def done(portal: str, sync: str | None = None, network: str = "testnet") -> HistoryComplete:
    return HistoryComplete(network=network, portal=portal, sync=sync)


def sync_done(sync: str, portals: int, network: str = "testnet") -> SyncComplete:
    return SyncComplete(network=network, sync=sync, portals=portals)


async def publish(
    settings: Settings, topic: str, records: list[Record | tuple[str, bytes]]
) -> None:
    """Publish records keyed by portal (or raw ``(key, bytes)``), waiting for acks."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for rec in records:
            if isinstance(rec, tuple):
                futures.append(await producer.send(topic, rec[1], key=rec[0].encode()))
            else:
                futures.append(await producer.send(topic, encode(rec), key=rec.key.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class CommandDriver:
    """Drives the pipeline from the command side, as the sink's protocol does.

    Reads every matrix command (whole topic, all partitions, real broker) and
    answers CreateRoom with RoomCreated, so pipeline tests can assert the exact
    command stream without a homeserver; the sink's own tests cover Matrix.

    ``existing`` maps a portal key to the ``last_bridged_ts`` of a room that
    already existed; ``auto`` = False leaves CreateRoom unanswered.
    """

    def __init__(self, settings: Settings, *, auto: bool = True) -> None:
        self.settings = settings
        self.auto = auto
        self.existing: dict[str, int] = {}
        self.hold_rooms: set[str] = set()  # portals whose CreateRoom we do not answer yet
        self.commands: list[tuple[int, int, Any]] = []  # (partition, offset, record)
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.answered: set[str] = set()

    async def __aenter__(self) -> CommandDriver:
        cat = self.settings.catalog
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        tps = [TopicPartition(cat.matrix_commands, p) for p in range(cat.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap)
        await self._producer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        assert self._consumer is not None and self._producer is not None
        await self._consumer.stop()
        await self._producer.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    cmd = decode(r.value)
                    assert r.key is not None and r.key.decode() == cmd.key
                    self.commands.append((r.partition, r.offset, cmd))
                    if isinstance(cmd, CreateRoom) and self.auto:
                        if cmd.key not in self.hold_rooms:
                            await self.answer(cmd.key)

    async def answer(self, key: str) -> None:
        network, _, portal = key.partition(":")
        created = RoomCreated(
            network=network,
            portal=portal,
            room_id=f"!{portal}:test",
            last_bridged_ts=self.existing.get(key),
        )
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.settings.catalog.portal_events, encode(created), key=key.encode()
        )
        self.answered.add(key)

    def creates(self, key: str | None = None) -> list[CreateRoom]:
        return [
            c for _, _, c in self.commands if isinstance(c, CreateRoom) and key in (None, c.key)
        ]

    def sends(self, key: str) -> list[SendMessage]:
        return [c for _, _, c in self.commands if isinstance(c, SendMessage) and c.key == key]

    def sent_ids(self, key: str) -> list[str]:
        return [c.message.id for c in self.sends(key)]

    async def wait_for(
        self, check: Callable[[], bool], timeout: float = 60, workers: tuple[Worker, ...] = ()
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for w in workers:
                assert w.alive(), f"worker exited:\n{w.log()[-3000:]}"
            if time.monotonic() > deadline:
                tail = "\n".join(w.log()[-3000:] for w in workers)
                raise AssertionError(f"timed out; {len(self.commands)} commands\n{tail}")
            await asyncio.sleep(0.1)


async def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` as (key, parsed JSON value) pairs."""
    return [(k, orjson.loads(v)) for k, v in await read_raw(settings, topic)]

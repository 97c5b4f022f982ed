"""The fault harness: a known history through worker and sink while faults are injected.

Shared by the quick CI run (tests/hostile/test_faults.py) and the soak
(bench/soak.py). Everything is real: the broker, Postgres, Synapse; the
worker and the sink run as ``backflow worker`` / ``backflow sink`` child
processes, and the sink talks to Synapse through ``FaultProxy`` so that the
homeserver can answer 5xx, time out or lose a reply. The verdict reads every
room back from Synapse: per portal, the source ids of its events must be
exactly the ids published, once each, in order.

Fault classes (each injected at a seeded random moment):

- ``worker_kill`` / ``sink_kill``: SIGKILL of the stage mid-batch, then a restart;
- ``pg_drop``: every Postgres connection of the run's database terminated
  (``pg_terminate_backend``; the shared server itself is never stopped);
- ``hs_5xx``: the homeserver answers 502/503/504 (with Retry-After sometimes)
  for a burst of sends;
- ``hs_timeout``: sends held for a while, then 504, as a gateway timing out;
- ``hs_lost_reply``: a send reaches Synapse but its reply is lost (502): the
  sink must settle the in-doubt send, not send it twice.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from connectors.matrix.content import SOURCE_KEY
from tests.fault_proxy import FaultProxy
from tests.helpers import REPO, portal_timeline, stage_env
from topics import bus
from topics.records import Content, HistoryComplete, NetworkMessage, PortalInfo, Record, Sender
from topics.settings import Settings

NETWORK = "faults"
BASE_TS = 1_690_000_000_000
KINDS = ("text", "text", "text", "notice", "emote")  # mixed kinds, all read back as events


def history(prefix: str, portals: int, per_portal: int) -> dict[str, list[NetworkMessage]]:
    """Messages per portal, oldest first (ids m00000...)."""
    out: dict[str, list[NetworkMessage]] = {}
    for p in range(portals):
        portal = f"{prefix}-{p:03d}"
        out[portal] = [
            NetworkMessage(
                network=NETWORK,
                portal=portal,
                id=f"m{i:05d}",
                sender=Sender(id=f"user{i % 4}", name=f"User {i % 4}"),
                ts=BASE_TS + i * 1000 + p,
                content=Content(kind=KINDS[i % len(KINDS)], body=f"{portal} #{i}"),
            )
            for i in range(per_portal)
        ]
    return out


def backfill_records(data: dict[str, list[NetworkMessage]]) -> list[Record]:
    """What an import publishes: portal, its history, its history_complete."""
    records: list[Record] = []
    for portal, msgs in data.items():
        records.append(PortalInfo(network=NETWORK, portal=portal, name=f"Faults {portal}"))
        records += msgs
        records.append(HistoryComplete(network=NETWORK, portal=portal, count=len(msgs)))
    return records


async def publish(settings: Settings, topic: str, records: Iterable[Record]) -> int:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        return await bus.send_all(producer, topic, list(records))
    finally:
        await producer.stop()


class Stage:
    """``backflow worker`` or ``backflow sink`` as a child process that can be killed."""

    def __init__(self, name: str, settings: Settings, logs: Path, **env: str) -> None:
        self.name = name
        self.env = stage_env(settings, PYTHONPATH=str(REPO), **env)
        self.log = logs / f"{name}.log"
        self.cwd = settings.state_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backflow.cli", self.name],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.alive() else None


@dataclass
class Verdict:
    """Per portal and in all: what Synapse shows against what was published."""

    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    portals_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.portals_missing)

    def line(self) -> str:
        return (
            f"expected {self.expected}, delivered {self.delivered}: lost {self.lost}, "
            f"duplicated {self.duplicated}, out of order {self.out_of_order}, "
            f"rooms missing {len(self.portals_missing)}"
        )


async def read_back(settings: Settings, data: dict[str, list[NetworkMessage]]) -> Verdict:
    """Every room from Synapse, compared with what was published for it."""
    verdict = Verdict()
    for portal, msgs in data.items():
        want = [m.id for m in msgs]
        events = await portal_timeline(settings, NETWORK, portal)
        if events is None:
            verdict.portals_missing.append(portal)
            tally(verdict, want, [])
            continue
        got = [e["content"][SOURCE_KEY]["id"] for e in events if SOURCE_KEY in e["content"]]
        tally(verdict, want, got)
    return verdict


def tally(verdict: Verdict, want: list[str], got: list[str]) -> None:
    """Add one room to the verdict: ``want`` published ids in order, ``got`` the room's."""
    verdict.expected += len(want)
    verdict.delivered += len(got)
    counts = Counter(got)
    verdict.duplicated += sum(n - 1 for n in counts.values() if n > 1)
    verdict.lost += sum(1 for i in want if i not in counts)
    first = list(dict.fromkeys(got))  # first appearance of each, in room order
    position = {mid: n for n, mid in enumerate(want)}
    known = [position[i] for i in first if i in position]
    verdict.out_of_order += sum(1 for a, b in zip(known, known[1:], strict=False) if b < a)


async def drop_postgres(database_url: str) -> int:
    """Terminate every other connection to this run's database; how many were cut."""
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()"""
            )
        )
    finally:
        await conn.close()


async def sends_in_flight(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('sink_intents') IS NOT NULL")
        return int(await conn.fetchval("SELECT count(*) FROM sink_intents")) if exists else 0
    finally:
        await conn.close()


async def mapped(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('sink_messages') IS NOT NULL")
        return int(await conn.fetchval("SELECT count(*) FROM sink_messages")) if exists else 0
    finally:
        await conn.close()


FAULT_CLASSES = ("worker_kill", "sink_kill", "pg_drop", "hs_5xx", "hs_timeout", "hs_lost_reply")


class Injector:
    """Injects one fault of a class; counts what was injected."""

    def __init__(
        self, settings: Settings, worker: Stage, sink: Stage, proxy: FaultProxy, rng: random.Random
    ) -> None:
        self.settings, self.worker, self.sink, self.proxy, self.rng = (
            settings,
            worker,
            sink,
            proxy,
            rng,
        )
        self.injected: Counter[str] = Counter()

    async def inject(self, kind: str) -> None:
        url = self.settings.database.url
        assert url is not None
        if kind in ("worker_kill", "sink_kill"):
            stage = self.worker if kind == "worker_kill" else self.sink
            if kind == "sink_kill":  # mid-batch: while sends are in flight, if any come
                deadline = time.monotonic() + 5
                while not await sends_in_flight(url) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            stage.kill()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            stage.start()
        elif kind == "pg_drop":
            await drop_postgres(url)
        elif kind == "hs_5xx":
            status = self.rng.choice((502, 503, 504))
            headers = {"Retry-After": "1"} if status == 503 else {}
            body = {"errcode": "M_UNKNOWN", "error": f"injected {status}"}
            self.proxy.inject(status, body, headers, times=self.rng.randint(2, 6), match="/send/")
        elif kind == "hs_timeout":
            body = {"errcode": "M_UNKNOWN", "error": "gateway timeout"}
            self.proxy.inject(504, body, times=2, match="/send/", delay=self.rng.uniform(1, 3))
        elif kind == "hs_lost_reply":
            for _ in range(self.rng.randint(1, 3)):
                self.proxy.drop_response_once(match="/send/")
        else:
            raise ValueError(kind)
        self.injected[kind] += 1


def sink_env(proxy: FaultProxy) -> dict[str, str]:
    """The sink talks to Synapse through the proxy; retries capped low for quick recovery."""
    return {"BACKFLOW_HOMESERVER_URL": proxy.url, "BACKFLOW_SINK_MAX_RETRY_DELAY_S": "2"}

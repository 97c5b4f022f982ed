"""Two sink processes in one consumer group: they split the rooms, and when one
stops in the middle of a backfill the other takes its rooms over, exactly once.

Every room is read back from Synapse: each message once, in order, with its
timestamp. On the mock broker a rebalance waits a full session timeout (6 s);
Apache Kafka splits within ~5 s and takes over within ~12 s (docs/kafka.md).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner

from tests.connectors.matrix.test_recovery import (
    check_rooms,
    mapped_count,
    publish_backfill,
    start_sink,
)
from tests.sink_helpers import BASE_TS, NET, publish, sends, text
from topics.settings import Settings

ASSIGNED = re.compile(r"Setting newly assigned partitions (.*) for group")
CREATED = re.compile(r"portal " + re.escape(NET) + r":(\S+): created room")


def partition_of(portal: str, partitions: int) -> int:
    """The partition the producer puts a portal's commands on (keyed by portal)."""
    key = f"{NET}:{portal}".encode()
    return DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))


def portals_per_partition(partitions: int, each: int) -> dict[str, int]:
    """Portal names, ``each`` on every partition, so both sinks certainly get rooms."""
    out: dict[str, int] = {}
    counts = dict.fromkeys(range(partitions), 0)
    tag = uuid.uuid4().hex[:6]
    n = 0
    while min(counts.values()) < each:
        portal = f"group-{tag}-{n}"
        n += 1
        p = partition_of(portal, partitions)
        if counts[p] < each:
            counts[p] += 1
            out[portal] = p
    return out


def last_assignment(log: Path) -> set[int] | None:
    found = ASSIGNED.findall(log.read_text(errors="replace")) if log.exists() else []
    if not found:
        return None
    return {int(p) for p in re.findall(r"partition=(\d+)", found[-1])}


def created_rooms(log: Path) -> set[str]:
    return set(CREATED.findall(log.read_text(errors="replace")))


async def wait_for(
    what: str, check: Callable[[], object], timeout: float, logs: list[Path]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        await asyncio.sleep(0.2)


def more(portal: str, start: int, count: int) -> list:
    return [
        text(portal, f"m{i}", f"user{i % 3}", BASE_TS + i * 1000, f"{portal} #{i}")
        for i in range(start, start + count)
    ]


async def test_two_sinks_split_rooms_and_take_over(stack: Settings, tmp_path: Path) -> None:
    partitions = stack.kafka.partitions
    owner = portals_per_partition(partitions, each=1)
    logs = [tmp_path / "sink-a.log", tmp_path / "sink-b.log"]
    sinks = [start_sink(stack, log) for log in logs]
    try:
        # Both in the group, the partitions split between them.
        def split() -> bool:
            a, b = (last_assignment(log) for log in logs)
            return bool(a) and bool(b) and not (a & b) and a | b == set(range(partitions))

        await wait_for("both sinks to own partitions", split, 90, logs)
        a_parts, b_parts = (last_assignment(log) for log in logs)
        assert a_parts is not None and b_parts is not None

        # Phase 1: each sink creates the rooms of its own partitions, and only those.
        data = {portal: more(portal, 0, 5) for portal in owner}
        await publish_backfill(stack, data)

        async def phase_done(n: int) -> bool:
            return await mapped_count(stack) >= n

        await wait_for("phase 1", lambda: phase_done(5 * len(owner)), 120, logs)
        rooms_a, rooms_b = created_rooms(logs[0]), created_rooms(logs[1])
        assert rooms_a == {p for p, part in owner.items() if part in a_parts}
        assert rooms_b == {p for p, part in owner.items() if part in b_parts}
        assert rooms_a and rooms_b and not rooms_a & rooms_b

        # Phase 2: a bigger batch; sink B is stopped while it is under way.
        phase2 = {portal: more(portal, 5, 20) for portal in owner}
        records = []
        for msgs in phase2.values():
            records += [type(s)(message=s.message, seq=s.seq + 5) for s in sends(msgs)]
        await publish(stack, records)
        await wait_for("phase 2 to start", lambda: phase_done(6 * len(owner)), 120, logs)
        sinks[1].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sinks[1].wait, 60) == 0, logs[1].read_text()[-3000:]

        # A takes every partition over, and with them B's rooms.
        await wait_for(
            "sink A to own every partition",
            lambda: last_assignment(logs[0]) == set(range(partitions)),
            90,
            logs,
        )
        # Phase 3, after B is gone: only A can deliver into B's rooms.
        phase3 = {portal: more(portal, 25, 5) for portal in owner}
        records = []
        for msgs in phase3.values():
            records += [type(s)(message=s.message, seq=s.seq + 25) for s in sends(msgs)]
        await publish(stack, records)
        total = len(owner) * 30
        await wait_for("every message", lambda: phase_done(total), 180, logs)

        expected = {p: data[p] + phase2[p] + phase3[p] for p in owner}
        assert await check_rooms(stack, expected) == total
        # Nobody created a room twice: the rooms B made are the ones A sent into.
        assert not created_rooms(logs[0]) & rooms_b
    finally:
        for proc in sinks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in sinks:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

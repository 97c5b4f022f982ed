"""The quick fault harness (CI): every fault class at least once during a backfill.

480 messages over 8 portals go through a real worker and sink into Synapse
while the harness (tests/fault_harness.py) SIGKILLs and restarts the worker
and the sink mid-batch, cuts every Postgres connection of the run's database,
and makes the homeserver answer 5xx, time out and lose replies. Every room is
then read back from Synapse: nothing lost, nothing duplicated, order kept.
The long version with a duration argument is bench/soak.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from backflow.stack.synapse import Synapse
from tests.conftest import unique
from tests.fault_harness import (
    FAULT_CLASSES,
    Injector,
    Stage,
    Verdict,
    backfill_records,
    history,
    mapped,
    publish,
    read_back,
    sink_env,
    tally,
)
from tests.fault_proxy import FaultProxy
from topics.settings import Settings


async def test_every_fault_class_loses_duplicates_and_reorders_nothing(
    stack: Settings, synapse: Synapse, tmp_path: Path
) -> None:
    seed = int(os.environ.get("BACKFLOW_TEST_SEED") or time.time_ns() % 10**6)
    rng = random.Random(seed)
    data = history(unique("q"), portals=8, per_portal=60)
    total = sum(len(m) for m in data.values())
    portals = list(data)
    first = {p: data[p] for p in portals[:4]}
    second = {p: data[p] for p in portals[4:]}
    assert stack.database.url is not None
    async with FaultProxy(synapse.url) as proxy:
        worker = Stage("worker", stack, tmp_path)
        sink = Stage("sink", stack, tmp_path, **sink_env(proxy))
        injector = Injector(stack, worker, sink, proxy, rng)
        worker.start()
        sink.start()
        try:
            await publish(stack, stack.catalog.history, backfill_records(first))
            deadline = time.monotonic() + 120
            while not await mapped(stack.database.url) and time.monotonic() < deadline:
                assert worker.alive() and sink.alive(), worker.tail() + sink.tail()
                await asyncio.sleep(0.2)
            plan = list(FAULT_CLASSES)
            rng.shuffle(plan)
            for kind in plan:
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await injector.inject(kind)
            # More history after the faults: the proxy's queued faults meet sends.
            await publish(stack, stack.catalog.history, backfill_records(second))
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert worker.alive(), worker.tail()
                assert sink.alive(), sink.tail()
                if await mapped(stack.database.url) >= total and not proxy.pending_faults:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # anything sent twice would show up now
            verdict = await read_back(stack, data)
        finally:
            sink.stop()
            worker.stop()
    print(f"seed {seed}; injected {dict(injector.injected)}; {verdict.line()}")
    assert verdict.ok, f"seed {seed}: {verdict.line()}\n{sink.tail()}"
    assert verdict.delivered == total
    assert set(injector.injected) == set(FAULT_CLASSES)
    assert proxy.pending_faults == 0, "some homeserver faults never met a request"
    assert (worker.starts, sink.starts) == (2, 2)


def test_the_verdict_sees_loss_duplicates_and_reordering() -> None:
    """The harness can fail: each defect is counted."""
    want = ["a", "b", "c", "d"]
    for got, field in (
        (["a", "b", "d"], "lost"),
        (["a", "b", "b", "c", "d"], "duplicated"),
        (["a", "c", "b", "d"], "out_of_order"),
    ):
        verdict = Verdict()
        tally(verdict, want, got)
        assert getattr(verdict, field) == 1 and not verdict.ok, (got, verdict)
    verdict = Verdict()
    tally(verdict, want, list(want))
    assert verdict.ok and verdict.delivered == 4

"""The long fault harness: a large known history backfilled while every fault class strikes.

    .venv/bin/python bench/fault_harness.py --messages 20000 --portals 100 --seed N

Starts its own broker (librdkafka's mock cluster), its own embedded Postgres
(pgserver, ``database.embedded``: the machine's shared server is never used,
so this one can be stopped) and its own Synapse (on SQLite, so a Postgres
restart does not take the homeserver with it). It publishes ``--portals``
portals of mixed kinds (text, notice, emote) as one import run (one
``sync``), with ``backfill.max_initial_conversations`` = portals - ``--held``:
the ``--held`` portals with the oldest messages stay held until a live message
arrives for them, sent at a seeded random point of the backfill's progress.

Meanwhile, every ``--fault-every`` seconds (seeded jitter) until everything is
delivered or ``--duration`` seconds passed, one fault from a seeded shuffle of
every class: those of tests/fault_harness.py (worker and sink SIGKILL and
restart, Postgres connections cut, homeserver 5xx, timeouts, lost replies)
and the long ones here:

- ``synapse_restart``: Synapse stopped and started again (same port, data);
- ``pg_restart``: the embedded Postgres stopped (pg_ctl: every session cut,
  refusing connections while down) and started again on the same data;
- ``sink_pause``: the sink SIGSTOPped for ``--pause`` seconds while the worker
  keeps releasing, then SIGCONT: a large backlog to drain (its size is printed).

At the end it reads every room back from Synapse and prints, per fault class,
the faults injected and the messages lost / duplicated / out of order, each
anomaly blamed on the latest fault before the event concerned (all must be 0);
it exits 1 otherwise, or when a stage exited without being killed, or a held
portal got its room before its live message. Not run in CI
(tests/hostile/test_faults.py is the quick version).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from backflow.stack.postgres import EmbeddedPostgres, resolve_admin_url  # noqa: E402
from backflow.stack.synapse import Synapse, default_appservice  # noqa: E402
from connectors.matrix.content import SOURCE_KEY  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.fault_harness import (  # noqa: E402
    BASE_TS,
    FAULT_CLASSES,
    NETWORK,
    Injector,
    Stage,
    Verdict,
    backfill_records,
    history,
    mapped,
    publish,
    sink_env,
    tally,
)
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.helpers import portal_timeline  # noqa: E402
from topics.records import (  # noqa: E402
    Content,  # noqa: E402
    HistoryComplete,
    NetworkMessage,
    Record,
    Sender,
    SyncComplete,
)
from topics.settings import Settings  # noqa: E402

LONG_CLASSES = ("synapse_restart", "pg_restart", "sink_pause")
ALL_CLASSES = FAULT_CLASSES + LONG_CLASSES
SYNC = "harness-run"


class LongInjector(Injector):
    """The quick harness's injector plus the faults that need owned servers."""

    def __init__(self, *args: object, synapse: Synapse, pg: EmbeddedPostgres, pause: float) -> None:
        super().__init__(*args)
        self.synapse, self.pg, self.pause = synapse, pg, pause
        self.timeline: list[tuple[float, str]] = []  # (wall clock s, class) at injection
        self.backlogs: list[int] = []

    async def inject(self, kind: str) -> None:
        self.timeline.append((time.time(), kind))
        if kind == "synapse_restart":
            await asyncio.to_thread(self.synapse.restart)
        elif kind == "pg_restart":
            await asyncio.to_thread(self.pg.restart)
        elif kind == "sink_pause":
            proc = self.sink.proc
            assert proc is not None
            proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(self.pause * self.rng.uniform(0.7, 1.3))
                self.backlogs.append(self.expected_total - await delivered(self.settings))
            finally:
                proc.send_signal(signal.SIGCONT)
        else:
            await super().inject(kind)
            return
        self.injected[kind] += 1

    expected_total = 0


async def delivered(settings: Settings) -> int:
    """The sink's message map size; retried while Postgres is away (a restart)."""
    url = settings.database.url
    while True:
        try:
            return await mapped(url)
        except Exception:  # noqa: BLE001 - connection refused or cut mid-restart
            await asyncio.sleep(1)


def import_run(data: dict[str, list[NetworkMessage]]) -> list[Record]:
    """One import run: every portal's history_complete names the sync, then sync_complete."""
    records = [
        dataclasses.replace(r, sync=SYNC) if isinstance(r, HistoryComplete) else r
        for r in backfill_records(data)
    ]
    return [*records, SyncComplete(network=NETWORK, sync=SYNC, portals=len(data))]


def live_message(portal: str, per_portal: int) -> NetworkMessage:
    """Newer than the portal's history: it requests the held portal's room."""
    ts = BASE_TS + per_portal * 1000 + 10_000
    body = Content(kind="text", body=f"{portal} live")
    return NetworkMessage(NETWORK, portal, "live0", Sender("live"), ts, body, history=False)


async def room_exists(settings: Settings, portal: str) -> bool:
    """Whether the portal's room exists; asked again while Synapse restarts."""
    while True:
        try:
            return await portal_timeline(settings, NETWORK, portal) is not None
        except Exception:  # noqa: BLE001 - homeserver down mid-restart
            await asyncio.sleep(1)


def blame(ts_ms: int | None, timeline: list[tuple[float, str]]) -> str:
    """The latest fault injected before ``ts_ms``; ``none`` before the first one."""
    culprit = "none"
    for t, kind in timeline:
        if ts_ms is not None and t * 1000 <= ts_ms:
            culprit = kind
    return culprit


def attribute(
    want: list[str], events: list[dict], timeline: list[tuple[float, str]], per: dict[str, Counter]
) -> None:
    """Add one room's anomalies to ``per[class]`` (lost / duplicated / out_of_order)."""
    got = [(e["content"][SOURCE_KEY]["id"], e.get("origin_server_ts")) for e in events]
    seen: dict[str, int | None] = {}
    for mid, ts in got:
        if mid in seen:
            per[blame(ts, timeline)]["duplicated"] += 1
        else:
            seen[mid] = ts
    position = {mid: n for n, mid in enumerate(want)}
    known = [(position[m], ts) for m, ts in seen.items() if m in position]
    for (a, _), (b, ts) in zip(known, known[1:], strict=False):
        if b < a:
            per[blame(ts, timeline)]["out_of_order"] += 1
    last_ts: int | None = None
    for mid in want:  # a lost message: blamed on what struck after its predecessor arrived
        if mid in seen:
            last_ts = seen[mid]
        else:
            per[blame(last_ts, timeline)]["lost"] += 1


async def read_back_long(
    settings: Settings, data: dict[str, list[NetworkMessage]], timeline: list[tuple[float, str]]
) -> tuple[Verdict, dict[str, Counter]]:
    verdict, per = Verdict(), {k: Counter() for k in ("none", *ALL_CLASSES)}
    for portal, msgs in data.items():
        want = [m.id for m in msgs]
        events = await portal_timeline(settings, NETWORK, portal)
        events = [e for e in events or [] if SOURCE_KEY in e["content"]]
        if not events:
            verdict.portals_missing.append(portal)
        tally(verdict, want, [e["content"][SOURCE_KEY]["id"] for e in events])
        attribute(want, events, timeline, per)
    return verdict, per


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="backflow-faults-"))
    kafka = EmbeddedKafka()
    admin, pg = await resolve_admin_url(None, work / "pg", embedded=True)
    assert pg is not None  # database.embedded: never the shared server
    appservice = default_appservice()
    synapse = Synapse(work / "synapse", appservices=[appservice])
    synapse.start()
    per_portal = args.messages // args.portals
    settings, _ = await make_settings(
        kafka,
        admin,
        synapse,
        appservice,
        work,
        **{"backfill.max_initial_conversations": args.portals - args.held},
    )
    data = history("h", args.portals, per_portal)
    held = sorted(data)[: args.held]  # the oldest messages: ranked last, no room yet
    total = sum(len(m) for m in data.values()) + len(held)
    # Each held portal's live message goes out once this share of the total is delivered.
    release_at = {p: int(rng.uniform(0.1, 0.8) * total) for p in held}
    early_rooms: list[str] = []
    unexpected_exits: list[str] = []
    t0 = time.monotonic()
    async with FaultProxy(synapse.url) as proxy:
        worker = Stage("worker", settings, work)
        sink = Stage("sink", settings, work, **sink_env(proxy))
        injector = LongInjector(
            settings, worker, sink, proxy, rng, synapse=synapse, pg=pg, pause=args.pause
        )
        injector.expected_total = total
        worker.start()
        sink.start()
        await publish(settings, settings.catalog.history, import_run(data))
        print(f"published {total - len(held)} messages over {args.portals} portals", flush=True)
        cycle: list[str] = []
        next_fault = time.monotonic() + args.fault_every * rng.uniform(0.5, 1.5)
        try:
            while (done := await delivered(settings)) < total:
                now = time.monotonic()
                if now - t0 > args.duration + args.drain:
                    print(f"gave up: {done} of {total} delivered", file=sys.stderr)
                    break
                for portal in [p for p, at in release_at.items() if done >= at]:
                    del release_at[portal]
                    if await room_exists(settings, portal):
                        early_rooms.append(portal)
                    live = live_message(portal, per_portal)
                    data[portal].append(live)
                    await publish(settings, settings.catalog.live, [live])
                if now >= next_fault and now - t0 < args.duration:
                    cycle = cycle or rng.sample(ALL_CLASSES, len(ALL_CLASSES))
                    kind = cycle.pop()
                    print(f"{now - t0:6.0f} s  {done:6d}/{total}  {kind}", flush=True)
                    await injector.inject(kind)
                    next_fault = time.monotonic() + args.fault_every * rng.uniform(0.5, 1.5)
                for stage in (worker, sink):
                    if not stage.alive():  # not killed by us: a finding, then carry on
                        unexpected_exits.append(f"{stage.name}: {stage.tail()[-1500:]}")
                        stage.start()
                await asyncio.sleep(1)
            drained = time.monotonic()
            await asyncio.sleep(3)  # anything sent twice would show now
            verdict, per = await read_back_long(settings, data, injector.timeline)
        finally:
            sink.stop()
            worker.stop()
    synapse.stop()
    kafka.close()
    pg.stop()
    ok = (
        verdict.ok
        and verdict.delivered == verdict.expected
        and not unexpected_exits
        and not early_rooms
    )
    print(
        f"fault harness: seed {args.seed}, {verdict.expected} messages over {args.portals} "
        f"portals ({args.held} held until a live message), {drained - t0:.0f} s"
    )
    print(
        f"{'fault class':<16} {'injected':>8} {'lost':>6} {'duplicated':>10} {'out of order':>12}"
    )
    for kind in ("none", *ALL_CLASSES):
        c = per[kind]
        n = "-" if kind == "none" else str(injector.injected[kind])
        print(f"{kind:<16} {n:>8} {c['lost']:>6} {c['duplicated']:>10} {c['out_of_order']:>12}")
    print(f"messages: {verdict.line()}")
    if injector.backlogs:
        print(f"backlog when the paused sink resumed: {injector.backlogs}")
    print(f"held portals with a room before their live message: {len(early_rooms)}")
    for line in unexpected_exits:
        print(f"stage exited without being killed:\n{line}", file=sys.stderr)
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="history messages in all")
    parser.add_argument("--portals", type=int, default=100)
    parser.add_argument("--held", type=int, default=10, help="portals held until a live message")
    parser.add_argument("--seed", type=int, default=uuid.uuid4().int % 10**6)
    parser.add_argument("--duration", type=float, default=1800, help="max seconds of faults")
    parser.add_argument("--fault-every", type=float, default=20, help="mean seconds between")
    parser.add_argument("--pause", type=float, default=30, help="mean seconds of sink_pause")
    parser.add_argument("--drain", type=float, default=900, help="max seconds after --duration")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

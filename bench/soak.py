"""Soak: minutes of mixed traffic with faults injected; nothing lost, duplicated or reordered.

Starts its own broker (librdkafka's mock cluster), a Postgres database on the
local server (or pgserver) and a Synapse, then for ``--duration`` seconds:

- live traffic: ``--live-rate`` messages/s posted to the live ingest endpoint
  (in this process) in small batches, spread over ``--live-portals`` portals;
- backfills: every ``--backfill-every`` seconds a history of
  ``--backfill-portals`` x ``--backfill-messages`` published as an import does;
- faults: every ``--fault-every`` seconds one of the harness's fault classes
  (tests/fault_harness.py) at a seeded random moment: worker or sink SIGKILL
  and restart, Postgres connections cut, homeserver 5xx, timeouts, lost replies;
- memory: RSS of the worker and the sink sampled every 2 s.

Then it waits for the sink to catch up, reads every room back from Synapse and
prints, per fault class, the faults injected, and messages lost / duplicated /
out of order (all must be 0), the throughput, the end-to-end latency of live
messages (ingest accepted -> event visible in Synapse, p50/p99, polled every
0.25 s) and each stage's memory after warm-up and at the end (flat: within
10%). Exit status 1 when anything was lost, duplicated or reordered.

    .venv/bin/python bench/soak.py [--duration 300] [--seed N] [--live-rate 20]

Not run in CI (tests/hostile/test_faults.py is the quick version).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from backflow.stack.postgres import drop_database, resolve_admin_url  # noqa: E402
from backflow.stack.synapse import Synapse, default_appservice  # noqa: E402
from connectors.ingest import serve  # noqa: E402
from connectors.matrix.content import SOURCE_KEY  # noqa: E402
from connectors.matrix.ghosts import room_alias  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.fault_harness import (  # noqa: E402
    FAULT_CLASSES,
    NETWORK,
    Injector,
    Stage,
    Verdict,
    backfill_records,
    history,
    mapped,
    publish,
    read_back,
    sink_env,
)
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from topics.records import Content, NetworkMessage, Sender  # noqa: E402
from topics.settings import Settings  # noqa: E402


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class LiveWatcher:
    """Polls the live portals' newest events; first time each source id is seen."""

    def __init__(self, settings: Settings, portals: list[str]) -> None:
        registration = yaml.safe_load(open(settings.appservice.registration))  # noqa: SIM115
        self.token = registration["as_token"]
        self.prefix = registration["namespaces"]["aliases"][0]["regex"].lstrip("#").split(".*")[0]
        self.settings, self.portals = settings, portals
        self.seen: dict[tuple[str, str], float] = {}
        self.rooms: dict[str, str] = {}

    async def run(self, stop: asyncio.Event) -> None:
        base = f"{self.settings.homeserver.url}/_matrix/client/v3"
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            while not stop.is_set():
                for portal in self.portals:
                    await self._poll(http, base, portal)
                await asyncio.sleep(0.25)

    async def _poll(self, http: aiohttp.ClientSession, base: str, portal: str) -> None:
        room = self.rooms.get(portal)
        if room is None:
            server = self.settings.homeserver.server_name
            alias = room_alias(self.prefix, NETWORK, portal, server)
            async with http.get(f"{base}/directory/room/{urllib.parse.quote(alias)}") as resp:
                if resp.status != 200:
                    return
                room = self.rooms[portal] = (await resp.json())["room_id"]
        url = f"{base}/rooms/{urllib.parse.quote(room)}/messages"
        async with http.get(url, params={"dir": "b", "limit": "200"}) as resp:
            if resp.status != 200:
                return
            chunk = (await resp.json()).get("chunk", [])
        now = time.monotonic()
        for event in chunk:
            source = event.get("content", {}).get(SOURCE_KEY)
            if source:
                self.seen.setdefault((portal, source["id"]), now)


async def live_traffic(
    url: str,
    portals: list[str],
    rate: float,
    stop: asyncio.Event,
    sent: dict[str, list[NetworkMessage]],
    accepted: dict[tuple[str, str], float],
) -> None:
    """``rate`` live messages/s in batches of up to 10, round-robin over portals."""
    from topics.codec import to_dict

    auth = {"Authorization": "Bearer soak", "Content-Type": "application/json"}
    n = 0
    async with aiohttp.ClientSession(headers=auth) as http:
        while not stop.is_set():
            started = time.monotonic()
            batch: list[NetworkMessage] = []
            for _ in range(max(1, int(rate / 2))):  # two requests per second
                portal = portals[n % len(portals)]
                mid = f"l{n:07d}"
                ts = 1_700_000_000_000 + n
                body = Content(kind="text", body=f"live {n}")
                batch.append(
                    NetworkMessage(NETWORK, portal, mid, Sender("live"), ts, body, history=False)
                )
                n += 1
            data = orjson.dumps([to_dict(m) for m in batch])
            while True:  # the client's side of the contract: retry until a 200
                try:
                    async with http.post(url, data=data) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            now = time.monotonic()
            for m in batch:
                sent.setdefault(m.portal, []).append(m)
                accepted[(m.portal, m.id)] = now
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def memory_line(name: str, samples: list[tuple[int, float, int]], warmup: float) -> str:
    """Memory of the longest-lived process of a stage: after warm-up vs at the end."""
    by_pid: dict[int, list[tuple[float, int]]] = {}
    for pid, t, kib in samples:
        by_pid.setdefault(pid, []).append((t, kib))
    pid, series = max(by_pid.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0])
    start = series[0][0]
    after = [kib for t, kib in series if t - start >= warmup] or [series[-1][1]]
    first, last, peak = after[0], after[-1], max(kib for _, kib in series)
    growth = (last - first) / first * 100
    flat = "flat" if abs(growth) <= 10 else "NOT FLAT"
    minutes = (series[-1][0] - start) / 60
    return (
        f"{name}: pid {pid} over {minutes:.1f} min: {first / 1024:.0f} MiB after warm-up, "
        f"{last / 1024:.0f} MiB at the end ({growth:+.1f}%, {flat}), peak {peak / 1024:.0f} MiB"
    )


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="backflow-soak-"))
    kafka = EmbeddedKafka()
    admin, embedded_pg = await resolve_admin_url(None, work / "pg")
    appservice = default_appservice()
    synapse = Synapse(work / "synapse", appservices=[appservice])
    synapse.start()
    port = free_port()
    settings, db = await make_settings(
        kafka,
        admin,
        synapse,
        appservice,
        work,
        **{"ingest.listen": f"127.0.0.1:{port}", "ingest.token": "soak"},
    )
    assert settings.database.url is not None
    live_portals = [f"live-{i}" for i in range(args.live_portals)]
    backfills: dict[str, list[NetworkMessage]] = {}
    live_sent: dict[str, list[NetworkMessage]] = {}
    accepted: dict[tuple[str, str], float] = {}
    samples: dict[str, list[tuple[int, float, int]]] = {"worker": [], "sink": []}
    stop = asyncio.Event()
    t0 = time.monotonic()
    async with FaultProxy(synapse.url) as proxy:
        worker = Stage("worker", settings, work)
        sink = Stage("sink", settings, work, **sink_env(proxy))
        injector = Injector(settings, worker, sink, proxy, rng)
        worker.start()
        sink.start()
        ready = asyncio.Event()
        ingest = asyncio.create_task(serve(settings, ready))
        await asyncio.wait_for(ready.wait(), 30)
        watcher = LiveWatcher(settings, live_portals)
        tasks = [
            asyncio.create_task(
                live_traffic(
                    f"http://127.0.0.1:{port}/v1/records",
                    live_portals,
                    args.live_rate,
                    stop,
                    live_sent,
                    accepted,
                )
            ),
            asyncio.create_task(watcher.run(stop)),
        ]
        next_backfill = next_fault = next_sample = time.monotonic()
        next_fault += args.fault_every
        round_no = 0
        try:
            while time.monotonic() - t0 < args.duration:
                now = time.monotonic()
                if now >= next_backfill:
                    data = history(f"bf{round_no}", args.backfill_portals, args.backfill_messages)
                    backfills.update(data)
                    await publish(settings, settings.catalog.history, backfill_records(data))
                    round_no += 1
                    next_backfill = now + args.backfill_every
                if now >= next_fault and args.fault_every > 0:
                    await asyncio.sleep(rng.uniform(0, 2))
                    await injector.inject(rng.choice(FAULT_CLASSES))
                    next_fault = time.monotonic() + args.fault_every
                if now >= next_sample:
                    for name, stage in (("worker", worker), ("sink", sink)):
                        pid = stage.pid()
                        kib = rss_kib(pid)
                        if pid is not None and kib is not None:
                            samples[name].append((pid, now - t0, kib))
                    next_sample = now + 2
                for stage in (worker, sink):
                    if not stage.alive():
                        print(f"{stage.name} exited:\n{stage.tail()}", file=sys.stderr)
                        return 2
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*tasks)
            traffic_end = time.monotonic()
            expected = {**backfills, **live_sent}
            total = sum(len(m) for m in expected.values())
            deadline = time.monotonic() + args.drain
            while await mapped(settings.database.url) < total and time.monotonic() < deadline:
                await asyncio.sleep(1)
            drained = time.monotonic()
            await asyncio.sleep(3)  # anything sent twice would show now
            verdict: Verdict = await read_back(settings, expected)
            final = await watcher_pass(watcher)
        finally:
            stop.set()
            ingest.cancel()
            await asyncio.gather(ingest, return_exceptions=True)
            sink.stop()
            worker.stop()
    synapse.stop()
    await drop_database(admin, db)
    kafka.close()
    if embedded_pg is not None:
        embedded_pg.stop()
    ok = verdict.ok and verdict.delivered == verdict.expected
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}", file=sys.stderr)

    latencies = [final[k] - accepted[k] for k in accepted if k in final]
    elapsed = drained - t0
    print(
        f"soak: {args.duration:.0f} s of traffic, seed {args.seed}, "
        f"caught up {drained - traffic_end:.0f} s after"
    )
    print(f"faults injected: {dict(sorted(injector.injected.items()))}")
    print(f"messages: {verdict.line()}")
    print(
        f"throughput: {verdict.delivered / elapsed:.1f} events/s into Synapse "
        f"({sum(len(m) for m in live_sent.values())} live, "
        f"{sum(len(m) for m in backfills.values())} backfilled)"
    )
    print(
        f"live latency (ingest 200 -> visible in Synapse, n={len(latencies)}): "
        f"p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s, "
        f"mean {statistics.fmean(latencies) if latencies else float('nan'):.2f} s"
    )
    for name, series in samples.items():
        if series:
            print(memory_line(name, series, args.warmup))
    return 0 if ok else 1


async def watcher_pass(watcher: LiveWatcher) -> dict[tuple[str, str], float]:
    """The watcher's first-seen times (one more poll so the last messages count)."""
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(1)
    stop.set()
    await task
    return watcher.seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of traffic")
    parser.add_argument("--seed", type=int, default=uuid.uuid4().int % 10**6)
    parser.add_argument("--live-rate", type=float, default=20, help="live messages/s")
    parser.add_argument("--live-portals", type=int, default=4)
    parser.add_argument("--backfill-every", type=float, default=30)
    parser.add_argument("--backfill-portals", type=int, default=10)
    parser.add_argument("--backfill-messages", type=int, default=50)
    parser.add_argument("--fault-every", type=float, default=15, help="0: no faults")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before memory counts")
    parser.add_argument("--drain", type=float, default=600, help="max seconds to catch up")
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: backflow's sink vs the homeserver's ingest limit vs a sequential bridge.

One run starts its own Synapse (rate limits off for the appservice), the
embedded mock Kafka broker and a database, then backfills PORTALS x MESSAGES
three ways into fresh rooms and prints events/s and ratios:

* unordered: CONCURRENCY requests in flight, no order, no bookkeeping, in two
  patterns (room-major bursts, which Synapse persists in per-room batches, and
  shuffled rooms); the room-major rate is the homeserver's ingest limit;
* sink: backflow's sink consuming commands from Kafka (ordered per room,
  durable map, intents, settle-on-retry), ``--rooms-in-flight`` rooms at once
  (a comma-separated list measures one sink run per value, each into fresh
  rooms).
  An ordered sender has one request per room in flight, so it can never get
  Synapse's same-room batching: compare it with both unordered patterns;
* sequential: one PUT at a time, like today's bridges backfilling a portal
  (measured on a sample of ``--sequential-sample`` messages).

The unordered and sink phases run ``--rounds`` times in alternating order
(ABBA), and each rate is the mean of its runs: Synapse's database grows over a
run and slows whatever runs later. Room creation and ghost joins are done
before timing for all three; the sink is timed from its first consumed
message command to its last send.

Synapse's own database is ``--synapse-db``: ``postgres`` (a fresh database on
the local server, as production homeservers run; the default when
127.0.0.1:5432 answers) or ``sqlite`` (Synapse's file database).

    .venv/bin/python bench/bench_sink.py [--portals 50] [--messages 200]
        [--synapse-db postgres|sqlite] [--rooms-in-flight 16[,32,50]] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from backflow.stack.postgres import (  # noqa: E402
    LOCAL_URL,
    create_database,
    drop_database,
    resolve_admin_url,
    server_answers,
)
from backflow.stack.synapse import (  # noqa: E402
    Synapse,
    create_synapse_database,
    default_appservice,
)
from connectors.matrix.client import MatrixClient  # noqa: E402
from connectors.matrix.ghosts import ghost_localpart  # noqa: E402
from connectors.matrix.runner import run_sink  # noqa: E402
from topics import bus  # noqa: E402
from topics.provision import provision  # noqa: E402
from topics.records import Content, CreateRoom, Member, NetworkMessage, Sender, SendMessage  # noqa: E402
from topics.settings import load  # noqa: E402

BASE_TS = 1_600_000_000_000
SENDERS = 3


def messages(network: str, portal: str, n: int) -> list[NetworkMessage]:
    return [
        NetworkMessage(
            network=network,
            portal=portal,
            id=f"m{i}",
            sender=Sender(id=f"user{i % SENDERS}", name=f"User {i % SENDERS}"),
            ts=BASE_TS + i * 1000,
            content=Content(kind="text", body=f"{portal} message {i}"),
        )
        for i in range(n)
    ]


async def make_rooms(
    client: MatrixClient, prefix: str, label: str, portals: int
) -> list[tuple[str, list[str]]]:
    """Rooms with SENDERS joined ghosts each (setup, not timed)."""
    ghosts = []
    for s in range(SENDERS):
        local = ghost_localpart(prefix, label, f"user{s}", client.server_name)
        await client.register(local)
        ghosts.append(f"@{local}:{client.server_name}")
    sem = asyncio.Semaphore(8)

    async def one(p: int) -> tuple[str, list[str]]:
        async with sem:
            room, _ = await client.create_room(
                f"{prefix}{label}_{uuid.uuid4().hex[:8]}_{p}", invite=ghosts
            )
            for g in ghosts:
                await client.join(room, g)
            return room, ghosts

    return await asyncio.gather(*(one(p) for p in range(portals)))


async def unordered(
    client: MatrixClient, rooms: list, n: int, concurrency: int, shuffle: bool
) -> float:
    jobs = [(room, ghosts, i) for room, ghosts in rooms for i in range(n)]
    if shuffle:
        random.Random(0).shuffle(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            room, ghosts, i = queue.get_nowait()
            await client.send(
                room,
                "m.room.message",
                {"msgtype": "m.text", "body": f"u{i}"},
                uuid.uuid4().hex,
                as_user=ghosts[i % SENDERS],
                ts=BASE_TS + i * 1000,
            )

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(jobs) / (time.monotonic() - started)


async def sequential(client: MatrixClient, rooms: list, sample: int) -> float:
    jobs = []
    per_room = max(1, sample // len(rooms))
    for room, ghosts in rooms:
        jobs += [(room, ghosts, i) for i in range(per_room)]
    started = time.monotonic()
    for room, ghosts, i in jobs[:sample]:
        await client.send(
            room,
            "m.room.message",
            {"msgtype": "m.text", "body": f"s{i}"},
            uuid.uuid4().hex,
            as_user=ghosts[i % SENDERS],
            ts=BASE_TS + i * 1000,
        )
    return min(sample, len(jobs)) / (time.monotonic() - started)


async def sink_run(settings, portals: int, n: int) -> tuple[float, int]:
    network = "bench"
    names = [f"p{uuid.uuid4().hex[:8]}" for _ in range(portals)]
    members = tuple(Member(id=f"user{s}", name=f"User {s}") for s in range(SENDERS))
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        # Rooms first (untimed, like the others), then the messages.
        await bus.send_all(
            producer,
            settings.catalog.matrix_commands,
            [CreateRoom(network=network, portal=p, members=members) for p in names],
        )
        await run_sink(settings, idle_exit=1.0)
        records = []
        for p in names:
            records += [
                SendMessage(message=m, seq=i + 2) for i, m in enumerate(messages(network, p, n))
            ]
        await bus.send_all(producer, settings.catalog.matrix_commands, records)
    finally:
        await producer.stop()
    stats = await run_sink(settings, idle_exit=1.0)
    assert stats.first_command is not None and stats.last_sent is not None
    print(f"  sink: {stats.summary()}", flush=True)
    return stats.sent / (stats.last_sent - stats.first_command), stats.sent


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--portals", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16, help="unordered sender")
    parser.add_argument(
        "--rooms-in-flight",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[16],
        help="sink; comma-separated values are each measured (e.g. 16,32,50)",
    )
    parser.add_argument("--sequential-sample", type=int, default=1000)
    parser.add_argument(
        "--rounds", type=int, default=2, help="phase rounds, alternating order (ABBA)"
    )
    parser.add_argument(
        "--synapse-db",
        choices=("sqlite", "postgres"),
        default=None,
        help="Synapse's database (default: postgres if 127.0.0.1:5432 answers, else sqlite)",
    )
    args = parser.parse_args()
    if args.synapse_db is None:
        args.synapse_db = "postgres" if await server_answers(LOCAL_URL) else "sqlite"

    work = Path(tempfile.mkdtemp(prefix="bench-sink-"))
    appservice = default_appservice()
    kafka = EmbeddedKafka()
    print(f"starting Synapse ({args.synapse_db}), broker and database in {work} ...", flush=True)
    admin, embedded_pg = await resolve_admin_url(None, work)
    suffix = uuid.uuid4().hex[:8]
    bench_db, synapse_db = f"bench_{suffix}", f"bench_synapse_{suffix}"
    synapse_db_url = None
    if args.synapse_db == "postgres":
        synapse_db_url = await create_synapse_database(admin, synapse_db)
    synapse = Synapse(work / "synapse", appservices=[appservice], database_url=synapse_db_url)
    try:
        synapse.start()
        db_url = await create_database(admin, bench_db)
        registration = work / "registration.yaml"
        import yaml

        registration.write_text(yaml.safe_dump(appservice.registration()))
        settings = load(env={}).with_overrides(
            {
                "kafka.bootstrap": kafka.bootstrap,
                "kafka.topic_prefix": f"bench{uuid.uuid4().hex[:6]}",
                "kafka.partitions": 8,
                "database.url": db_url,
                "homeserver.url": synapse.url,
                "homeserver.server_name": synapse.server_name,
                "appservice.registration": str(registration),
                "sink.max_rooms_in_flight": args.rooms_in_flight[0],
                "state_dir": str(work / "state"),
            }
        )
        await provision(settings.catalog, bootstrap=kafka.bootstrap, embedded=kafka)
        total = args.portals * args.messages
        async with MatrixClient(
            synapse.url, appservice.as_token, synapse.server_name, appservice.sender_localpart
        ) as client:
            # Two unordered patterns: room-major (concurrent requests hit the same
            # room, so Synapse persists them in one batch: its best case, but an
            # order-keeping sender can never do that) and shuffled rooms.
            # Synapse's database grows over a run and slows every later phase,
            # so the phases run in ABBA order over --rounds and each rate is the
            # mean of its runs: no pattern gains from going first.
            phases: list[str | int] = ["room-major", "shuffled", *args.rooms_in_flight]
            runs: dict[str | int, list[float]] = {phase: [] for phase in phases}
            for round_no in range(args.rounds):
                order = phases if round_no % 2 == 0 else phases[::-1]
                for phase in order:
                    if isinstance(phase, str):
                        label = f"{phase[0]}{round_no}"
                        rooms_u = await make_rooms(
                            client, appservice.user_prefix, label, args.portals
                        )
                        print(
                            f"unordered ({phase}): {total} events, "
                            f"{args.concurrency} in flight",
                            flush=True,
                        )
                        rate = await unordered(
                            client, rooms_u, args.messages, args.concurrency, phase == "shuffled"
                        )
                    else:
                        print(f"sink: {total} events, {phase} rooms in flight", flush=True)
                        rate, sent = await sink_run(
                            settings.with_overrides({"sink.max_rooms_in_flight": phase}),
                            args.portals,
                            args.messages,
                        )
                        assert sent == total, f"sink sent {sent} of {total}"
                    print(f"  {rate:.1f} events/s", flush=True)
                    runs[phase].append(rate)
            rates = {phase: sum(r) / len(r) for phase, r in runs.items()}
            sink_rates = {rif: rates[rif] for rif in args.rooms_in_flight}
            rooms_s = await make_rooms(client, appservice.user_prefix, "s", args.portals)
            print(f"sequential: {args.sequential_sample} events ...", flush=True)
            q_rate = await sequential(client, rooms_s, args.sequential_sample)
        u_rate, r_rate = rates["room-major"], rates["shuffled"]
        print()
        print(
            f"backfill {args.portals} portals x {args.messages} messages into Synapse "
            f"on {args.synapse_db}; unordered: {args.concurrency} requests in flight; "
            f"mean of {args.rounds} rounds in alternating order"
        )
        for phase, r in runs.items():
            print(f"  runs {str(phase):<10}: " + ", ".join(f"{x:.1f}" for x in r))
        rows = [
            ("unordered, room-major burst", f"{u_rate:8.1f} events/s (homeserver ingest limit)"),
            ("unordered, shuffled rooms", f"{r_rate:8.1f} events/s"),
        ]
        rows += [
            (f"backflow sink, {rif} rooms", f"{s_rate:8.1f} events/s (ordered)")
            for rif, s_rate in sink_rates.items()
        ]
        rows.append(("sequential sender", f"{q_rate:8.1f} events/s (today's bridges)"))
        for rif, s_rate in sink_rates.items():
            rows += [
                (f"sink({rif}) / room-major", f"{s_rate / u_rate:8.0%}  (target >= 80%)"),
                (f"sink({rif}) / shuffled", f"{s_rate / r_rate:8.0%}"),
                (f"sink({rif}) / sequential", f"{s_rate / q_rate:8.1f}x"),
            ]
        for label, value in rows:
            print(f"  {label:<28}: {value}")
    finally:
        synapse.stop()
        kafka.close()
        if synapse_db_url is not None:
            await drop_database(admin, synapse_db)
        if "db_url" in locals():
            await drop_database(admin, bench_db)
        if embedded_pg is not None:
            embedded_pg.stop()


if __name__ == "__main__":
    asyncio.run(main())

"""Probe: does a room keep send order when several sends into it are in flight?

The sink keeps one send per room in flight. The unordered room-major burst in
``bench_sink.py`` is faster because Synapse persists concurrent same-room
events together. This probe asks whether an ordered sender could have that
too: for each WINDOW it sends MESSAGES numbered messages into fresh rooms,
request ``i`` leaving as soon as request ``i - WINDOW`` has been answered (so
requests always leave in message order), with 16 requests in flight in total
(16 / WINDOW rooms at once). Then it reads every room back and reports:

* events/s;
* misplaced: messages the room shows out of order, read back forwards through
  ``/messages`` (``MESSAGES`` minus the longest in-order run);
* forked: message events that share their DAG depth with another (from
  Synapse's database), i.e. Synapse created them concurrently on the same
  parents, so their order is decided by persistence, not by the sender.

WINDOW 1 is what the sink does; WINDOW 16 is the room-major burst.

    .venv/bin/python bench/probe_room_order.py [--messages 200] [--windows 1,2,4,16]

Needs the local PostgreSQL (Synapse runs on it, as production homeservers do).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backflow.stack.postgres import drop_database, resolve_admin_url  # noqa: E402
from backflow.stack.synapse import (  # noqa: E402
    Synapse,
    create_synapse_database,
    default_appservice,
)
from connectors.matrix.client import MatrixClient  # noqa: E402

IN_FLIGHT = 16
BASE_TS = 1_600_000_000_000


def misplaced(order: list[int]) -> int:
    """How many entries sit outside the longest increasing run (patience sorting)."""
    tails: list[int] = []
    for value in order:
        at = bisect.bisect_left(tails, value)
        if at == len(tails):
            tails.append(value)
        else:
            tails[at] = value
    return len(order) - len(tails)


async def windowed(client: MatrixClient, room: str, n: int, window: int) -> None:
    """Send 0..n-1 into ``room``; send i leaves once send i - window has returned."""
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        try:
            await client.send(
                room,
                "m.room.message",
                {"msgtype": "m.text", "body": str(i)},
                uuid.uuid4().hex,
                ts=BASE_TS + i * 1000,
            )
        finally:
            slots.release()

    tasks = []
    for i in range(n):
        await slots.acquire()  # in index order: request i leaves before i + 1
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument(
        "--windows", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 16]
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="probe-order-"))
    appservice = default_appservice()
    admin, embedded_pg = await resolve_admin_url(None, work)
    synapse_db = f"bench_synapse_{uuid.uuid4().hex[:8]}"
    synapse_db_url = await create_synapse_database(admin, synapse_db)
    synapse = Synapse(work / "synapse", appservices=[appservice], database_url=synapse_db_url)
    rows = []
    try:
        synapse.start()
        db = await asyncpg.connect(synapse_db_url)
        async with MatrixClient(
            synapse.url, appservice.as_token, synapse.server_name, appservice.sender_localpart
        ) as client:
            for window in args.windows:
                rooms = [
                    (
                        await client.create_room(
                            f"{appservice.alias_prefix}probe_{uuid.uuid4().hex[:10]}"
                        )
                    )[0]
                    for _ in range(max(1, IN_FLIGHT // window))
                ]
                started = time.monotonic()
                await asyncio.gather(*(windowed(client, r, args.messages, window) for r in rooms))
                rate = len(rooms) * args.messages / (time.monotonic() - started)
                wrong = forked = 0
                for room in rooms:
                    events = await client.timeline(room, types=["m.room.message"])
                    wrong += misplaced([int(e["content"]["body"]) for e in events])
                    forked += await db.fetchval(
                        "SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM events"
                        " WHERE room_id = $1 AND type = 'm.room.message'"
                        " GROUP BY depth HAVING count(*) > 1) AS same_depth",
                        room,
                    )
                total = len(rooms) * args.messages
                rows.append((window, len(rooms), rate, wrong, forked, total))
                print(
                    f"window {window:>2} x {len(rooms):>2} rooms: {rate:6.1f} events/s, "
                    f"misplaced {wrong}/{total}, forked {forked}/{total}",
                    flush=True,
                )
        await db.close()
    finally:
        synapse.stop()
        await drop_database(admin, synapse_db)
        if embedded_pg is not None:
            embedded_pg.stop()
    base = rows[0][2] if rows else 0
    for window, _rooms, rate, wrong, forked, total in rows:
        print(
            f"  window {window:>2}: {rate:6.1f} events/s ({rate / base:4.0%} of window "
            f"{rows[0][0]}), misplaced {wrong / total:5.1%}, forked {forked / total:5.1%}"
        )


if __name__ == "__main__":
    asyncio.run(main())

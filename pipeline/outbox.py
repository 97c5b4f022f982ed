"""The command outbox in Postgres: what is released but not yet in the command log.

A release (pipeline.hold) gives each released message a per-portal ``seq``
and records it in pipeline_release in the same transaction; the flush
(pipeline.runtime) reads pending commands here in (portal, seq) order,
produces them and marks them produced once the broker acked them, or once the
read-back of the log after a crash found them there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from pipeline.portal import ALL_PRODUCED, ROOM_REQUESTED, advance_produced
from topics.codec import create_room_command

COMMAND_OFFSETS = """
SELECT partition, next_offset FROM pipeline_command_offset WHERE partition = ANY($1::int[])
"""

PENDING_ROOMS = """
SELECT key, network, portal, partition, info FROM pipeline_portal
WHERE room_requested AND NOT create_room_produced AND partition = ANY($1::int[])
ORDER BY key
"""

OUTBOX_PORTALS = """
SELECT key, partition, produced_seq, produced_extra, next_seq
FROM pipeline_portal
WHERE partition = ANY($1::int[]) AND next_seq > produced_seq + 1
ORDER BY key
"""

# Per portal, its release chunks past what is produced (LATERAL with OFFSET 0:
# per-portal index probes, never a hash join over the whole table).
RELEASE_CHUNKS = """
SELECT u.key, r.first_seq, r.arrivals
FROM unnest($1::text[], $2::bigint[]) AS u(key, done)
CROSS JOIN LATERAL (
    SELECT first_seq, arrivals FROM pipeline_release r
    WHERE r.portal_key = u.key AND r.last_seq > u.done
    ORDER BY r.last_seq LIMIT $3) AS r
ORDER BY u.key, r.first_seq
"""

# The records in the order asked for (ordinality), only the bytes.
RECORDS = """
SELECT m.record
FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(key, arrival, i)
CROSS JOIN LATERAL (
    SELECT record FROM pipeline_message m
    WHERE m.portal_key = u.key AND m.arrival = u.arrival OFFSET 0) AS m
ORDER BY u.i
"""

# $2 -> $3: portal.ROOM_REQUESTED.
ROOMS_PRODUCED = """
UPDATE pipeline_portal SET create_room_produced = true, room_requested = true,
       state = CASE WHEN state = $2 THEN $3 ELSE state END
WHERE key = ANY($1::text[])
"""

# Lock in key order, like the hold store does, so the two never deadlock.
LOCK_PRODUCED = """
SELECT key, produced_seq, produced_extra FROM pipeline_portal
WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
"""

# $4 -> $5: portal.ALL_PRODUCED, once nothing released is left to produce.
SENDS_PRODUCED = """
UPDATE pipeline_portal p SET produced_seq = u.done,
       produced_extra = string_to_array(u.extra, ',')::bigint[],
       state = CASE WHEN p.state = $4
                     AND p.next_seq <= u.done + 1 + cardinality(string_to_array(u.extra, ','))
                    THEN $5 ELSE p.state END,
       updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(key, done, extra)
WHERE p.key = u.key
"""

OFFSETS_PRODUCED = """
INSERT INTO pipeline_command_offset (partition, next_offset)
SELECT * FROM unnest($1::int[], $2::bigint[])
ON CONFLICT (partition) DO UPDATE
SET next_offset = greatest(pipeline_command_offset.next_offset, EXCLUDED.next_offset)
"""

# $2 -> $3: portal.ALL_PRODUCED.
SETTLE_BACKFILLING = """
UPDATE pipeline_portal SET state = $3, updated_at = now()
WHERE state = $2 AND partition = ANY($1::int[])
  AND next_seq <= produced_seq + 1 + cardinality(produced_extra)
"""


@dataclass(slots=True)
class OutboxPortal:
    """A portal with released commands that are not all in the command log."""

    key: str
    partition: int
    produced_seq: int
    produced_extra: frozenset[int]
    next_seq: int

    @property
    def pending(self) -> int:
        return self.next_seq - 1 - self.produced_seq - len(self.produced_extra)


class Outbox:
    """Reads and marks of the outbox, one transaction per call."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def command_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """Per command-log partition, the offset up to which it was read back."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(COMMAND_OFFSETS, list(partitions))
        return {r["partition"]: r["next_offset"] for r in rows}

    async def pending_rooms(self, partitions: Sequence[int]) -> list[tuple[str, int, bytes]]:
        """Requested rooms whose CreateRoom is not in the log yet: (key, partition, bytes)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(PENDING_ROOMS, list(partitions))
        return [
            (
                r["key"],
                r["partition"],
                create_room_command(r["network"], r["portal"], r["info"]),
            )
            for r in rows
        ]

    async def outbox_portals(self, partitions: Sequence[int]) -> list[OutboxPortal]:
        """Portals of these partitions with released commands not yet in the log."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(OUTBOX_PORTALS, list(partitions))
        return [
            OutboxPortal(
                key=r["key"],
                partition=r["partition"],
                produced_seq=r["produced_seq"],
                produced_extra=frozenset(r["produced_extra"]),
                next_seq=r["next_seq"],
            )
            for r in rows
        ]

    async def outbox_page(
        self, portals: Sequence[OutboxPortal], limit: int
    ) -> list[tuple[OutboxPortal, int, bytes]]:
        """The next commands of these portals not yet in the log: (portal, seq, record).

        In (portal, seq) order, at most ``limit`` of them.
        """
        by_key = {p.key: p for p in portals}
        async with self.pool.acquire() as conn:
            chunks = await conn.fetch(
                RELEASE_CHUNKS, list(by_key), [p.produced_seq for p in by_key.values()], limit
            )
            wanted: list[tuple[OutboxPortal, int, int]] = []
            for chunk in chunks:
                portal = by_key[chunk["key"]]
                for seq, arrival in enumerate(chunk["arrivals"], chunk["first_seq"]):
                    if seq > portal.produced_seq and seq not in portal.produced_extra:
                        wanted.append((portal, seq, arrival))
                if len(wanted) >= limit:
                    del wanted[limit:]
                    break
            if not wanted:
                return []
            records = await conn.fetch(
                RECORDS, [p.key for p, _, _ in wanted], [a for _, _, a in wanted]
            )
        if len(records) != len(wanted):  # cannot happen: rows are never deleted
            raise RuntimeError("outbox rows missing from pipeline_message")
        return [(p, seq, r[0]) for (p, seq, _), r in zip(wanted, records, strict=True)]

    async def mark_produced(
        self,
        rooms: Sequence[str],
        sends: Mapping[str, Iterable[int]],
        offsets: dict[int, int],
    ) -> None:
        """Record what is in the log (after the ack, or found by the recovery scan).

        ``sends`` maps a portal to seqs now known to be in the log; its
        ``produced_seq`` moves over every contiguous one (the rest, beyond a
        gap a failed produce left, are remembered in ``produced_extra``).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if rooms:
                await conn.execute(
                    ROOMS_PRODUCED,
                    list(rooms),
                    ROOM_REQUESTED.source.value,
                    ROOM_REQUESTED.target.value,
                )
            if sends:
                rows = await conn.fetch(LOCK_PRODUCED, sorted(sends))
                keys, dones, extras = [], [], []
                for r in rows:
                    done, extra = advance_produced(
                        r["produced_seq"], r["produced_extra"], sends[r["key"]]
                    )
                    keys.append(r["key"])
                    dones.append(done)
                    extras.append(",".join(map(str, extra)))
                await conn.execute(
                    SENDS_PRODUCED,
                    keys,
                    dones,
                    extras,
                    ALL_PRODUCED.source.value,
                    ALL_PRODUCED.target.value,
                )
            if offsets:
                await conn.execute(OFFSETS_PRODUCED, list(offsets), list(offsets.values()))

    async def settle_backfilling(self, partitions: Sequence[int]) -> None:
        """Portals in BACKFILLING with nothing left to produce are LIVE."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                SETTLE_BACKFILLING,
                list(partitions),
                ALL_PRODUCED.source.value,
                ALL_PRODUCED.target.value,
            )
